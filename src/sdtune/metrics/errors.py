"""The one exception the metrics raise on purpose."""

from __future__ import annotations


class MetricUnavailable(Exception):
    """A metric cannot be computed here (a model that cannot be had, inputs it needs are absent).

    The message is one line that says what is missing and how to provide it;
    :func:`sdtune.metrics.compute_all` reports it as the metric's ``skipped`` reason.
    """


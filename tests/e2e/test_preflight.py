"""Bad input, in every command: one line naming the problem and the fix, exit code 2, no traceback,
and nothing the user had lost or changed (issue #20, §3–6).

One table of commands × bad inputs runs through ``sdtune.cli.main`` in this process. Each case gets
its own copy of a workspace that holds a finished LoRA run, its experiment file and the mistakes
users make (a folder without captions, a corrupt image, a LoRA of another family, a file where a
folder goes…); the workspace, the tiny model and the tiny data set are hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import experiment_dict
from safetensors.torch import load_file, save_file

from sdtune import preflight, records
from sdtune.cli import main
from sdtune.experiment import load_experiment
from sdtune.training import train_technique
from sdtune.training.run_dir import claim_run_dir, release_run_dir, replaced_path
from sdtune.util.paths import OutputPathError, check_output_file, check_writable_folder

UNWRITABLE = "/sys/sdtune-output"  # /sys refuses new files even to root (chmod does not stop root)


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_model, tiny_data, family_model):
    """A workspace: experiment.yaml (paths relative to it), a finished LoRA run in runs/lora, and
    the inputs of the cases below."""
    folder = tmp_path_factory.mktemp("workspace")
    raw = experiment_dict(tiny_model, tiny_data, max_train_steps=1, batch_size=1, gradient_accumulation_steps=1)
    raw["techniques"]["lora"] = {"kind": "lora", "rank": 4, "alpha": 4}
    raw["output_dir"] = "runs"
    (folder / "experiment.yaml").write_text(yaml.safe_dump(raw))
    train_technique(load_experiment(folder / "experiment.yaml"), "lora", progress=False)
    (folder / "broken").mkdir()
    shutil.copy(tiny_data / "000.png", folder / "broken" / "a.png")  # an image without a caption
    shutil.copytree(tiny_data, folder / "corrupt")
    (folder / "corrupt" / "003.png").write_bytes(b"not a png")  # decodes only when training starts
    (folder / "a-file").write_text("mine")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("mine")
    run = folder / "runs" / "lora"
    sdxl = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_base_model_version": "sdxl_base_v1-0"}
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8)}, folder / "sdxl-lora.safetensors", sdxl)
    save_file({"mine": torch.zeros(1)}, folder / "mine.safetensors")
    _wider_copy(run, folder / "mixed-run")
    _edited_record(run, folder / "newer-run", lambda r: r["config"]["model"].update(quantization="int4"))
    _edited_record(run, folder / "unknown-kind-run", lambda r: r["technique"].update(kind="hyper-lora"))
    _edited_record(run, folder / "future-run", lambda r: r.update(schema_version=99))
    _edited_record(run, folder / "ti-run", lambda r: r["technique"].update(kind="textual-inversion"))
    save_file({"<zz>": torch.zeros(1, 7)}, folder / "ti-run" / "learned_embeds.safetensors")  # another encoder's width
    (folder / "ti-run" / "textual_inversion.json").write_text(json.dumps(
        {"placeholder_token": "<zz>", "tokens": ["<zz>"], "files": {"text_encoder": "learned_embeds.safetensors"}}))
    _edited_record(run, folder / "partial-run", lambda r: r["technique"].update(kind="partial"))
    save_file({"unet.conv_in.weight": torch.zeros(2, 2, 1, 1)}, folder / "partial-run" / "partial_weights.safetensors")
    _edited_record(run, folder / "moved-base-run", lambda r: r["config"]["model"].update(path=str(family_model("sdxl"))))
    _edited_record(run, folder / "gone-base-run", lambda r: r["config"]["model"].update(path="/no/such/base"))
    _edited_record(run, folder / "full-run", lambda r: (r["technique"].update(kind="full"),
                                                        r["config"]["model"].update(path="/no/such/base")))
    shutil.copy(tiny_model / "model_index.json", folder / "full-run" / "model_index.json")
    shutil.copytree(run, folder / "other-run")
    shutil.copy(tiny_model / "model_index.json", folder / "other-run" / "model_index.json")
    _edited_record(run, folder / "interrupted-run", lambda r: r.update(status="interrupted"))
    shutil.copytree(family_model("sdxl"), folder / "sdxl-base")
    shutil.copytree(tiny_model, folder / "sd1-base")
    for name, model in (("records-a", "one-model"), ("records-b", "another-model")):
        records.write_record(folder / "mixed-report" / "records" / f"train-{name}-seed0.json", {
            "kind": "train", "status": "failed", "technique": {"name": name, "kind": "lora"}, "seeds": {"train": 0},
            "config": {"model": {"path": model, "family": "sd1"}},
        })
    return folder


def _wider_copy(run: Path, copy: Path) -> None:
    """The run with LoRA files of a wider model (as an SDXL LoRA dropped into an SD1 run is)."""
    shutil.copytree(run, copy)
    tensors = load_file(copy / "pytorch_lora_weights.safetensors")
    wider = {
        key: torch.nn.functional.pad(value, (0, 16)) if "lora_A" in key else torch.nn.functional.pad(value, (0, 0, 0, 16))
        for key, value in tensors.items()
    }
    save_file(wider, copy / "pytorch_lora_weights.safetensors")


def _edited_record(run: Path, copy: Path, edit) -> None:
    shutil.copytree(run, copy)
    record = json.loads((copy / "record.json").read_text())
    edit(record)
    (copy / "record.json").write_text(json.dumps(record))


@pytest.fixture
def workspace(template, tmp_path, monkeypatch):
    """A private copy of the template, as the current folder; no process-wide allocator change."""
    folder = tmp_path / "w"
    shutil.copytree(template, folder)
    monkeypatch.chdir(folder)
    monkeypatch.setattr("sdtune.util.allocator.keep_freed_memory", lambda: None)
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    return folder


def tree_state(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots`` (hidden ones too) → its content's hash ('dir' for folders)."""
    state = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            state[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    message: str | tuple[str, ...]  # fragments of the one line
    env: dict[str, str] = field(default_factory=dict)


TRAIN = ["train", "experiment.yaml", "--technique", "lora", "--no-progress"]
TI = ["--set", "techniques.ti.kind=textual-inversion", "--set", "techniques.ti.placeholder_token=<zz>",
      "--set", "techniques.ti.initializer_token=red"]
LAUNCHED = {"RANK": "0", "MASTER_ADDR": "127.0.0.1"}
CASES = [
    # §3 destructive flags check first (the finished run in runs/lora must survive)
    Case("train-overwrite-broken-data", [*TRAIN, "--overwrite", "--set", "data.source=./broken"], "data.source: no captions found"),
    Case("train-overwrite-fails-after-claim", [*TRAIN, "--overwrite", "--set", "data.source=./corrupt",
                                               "--set", "data.on_bad_image=error"], "unreadable image"),
    Case("train-finished-run", TRAIN, "holds a finished run; pass --overwrite"),
    # §4 things that do not belong together
    Case("train-family-vs-folder", [*TRAIN, "--set", "model.family=sdxl"], "model.family: 'sdxl', but"),
    Case("train-init-from-other-family", [*TRAIN, "--overwrite", "--set", "techniques.lora.init_from=sdxl-lora.safetensors"],
         "was trained on a model of family sdxl"),
    Case("train-text-encoder-of-other-family", [*TRAIN, "--set", "techniques.lora.text_encoders=[text_encoder_2]"],
         "'text_encoder_2' is not a text encoder of sd1"),
    Case("train-placeholder-not-in-captions", ["train", "experiment.yaml", "--technique", "ti", *TI],
         "no caption contains the placeholder '<zz>'"),
    # §5 every path and name, before the model loads
    Case("train-missing-validation", [*TRAIN, "--set", "data.validation=./no-such-folder"], ("data.validation: '", "no-such-folder' does not exist")),
    Case("train-validation-without-captions", [*TRAIN, "--output", "elsewhere", "--set", "data.validation=./broken"],
         "data.validation: no captions found"),
    Case("train-missing-prompts-file", [*TRAIN, "--set", "evaluation.prompts_file=./prompts.txt"], "evaluation.prompts_file"),
    Case("train-missing-vae", [*TRAIN, "--set", "model.vae=./no-vae"], ("model.vae: '", "no-vae' does not exist")),
    Case("train-missing-init-from", [*TRAIN, "--set", "techniques.lora.init_from=./none.safetensors"], "init_from"),
    Case("train-unknown-technique", [*TRAIN[:3], "nope"], "--technique 'nope' is not a technique"),
    Case("train-output-is-a-file", [*TRAIN, "--output", "a-file"], "--output: 'a-file' is a file"),
    Case("train-output-unwritable", [*TRAIN, "--output", UNWRITABLE], "--output: cannot write in '/sys'"),
    # §6 launch misuse
    Case("train-world-size-alone", TRAIN, "WORLD_SIZE=2 is set but RANK and MASTER_ADDR are not", {"WORLD_SIZE": "2"}),
    Case("train-more-processes-than-images", [*TRAIN, "--output", "o", "--set", "data.max_samples=2"],
         "3 processes were launched for 2 training images", {"WORLD_SIZE": "3", **LAUNCHED}),
    Case("train-fsdp-on-one-process", [*TRAIN, "--output", "o"], "asks for FSDP2 sharding but one process",
         {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_CPU": "true"}),
    Case("train-fsdp1", [*TRAIN, "--output", "o"], "FSDP1 is not supported", {"WORLD_SIZE": "2", **LAUNCHED,
                                                                                "ACCELERATE_USE_FSDP": "true"}),
    Case("train-compile-with-deepspeed", [*TRAIN, "--output", "o", "--set", "train.compile=true"],
         "train.compile: true is not supported with DeepSpeed", {"WORLD_SIZE": "2", **LAUNCHED, "ACCELERATE_USE_DEEPSPEED": "1"}),
    Case("train-fp16-on-cpu", [*TRAIN, "--output", "o", "--set", "train.mixed_precision=fp16"], "'fp16' needs a CUDA GPU",
         {"ACCELERATE_USE_CPU": "true"}),
    # compare, --plan, --only, --evaluate-only
    Case("compare-only-unknown", ["compare", "experiment.yaml", "--only", "lora,nope"], "--only 'nope' is not a technique"),
    Case("plan-only-unknown", ["compare", "experiment.yaml", "--plan", "--only", "a,b"], "--only 'a' is not a technique"),
    Case("compare-seeds-twice", ["compare", "experiment.yaml", "--seeds", "1,1"], "--seeds: 1 is listed twice"),
    Case("compare-evaluate-only-nowhere", ["compare", "experiment.yaml", "--evaluate-only", "--output", "nowhere"],
         "--evaluate-only: 'nowhere' is not a folder"),
    Case("compare-reuses-another-experiment", ["compare", "experiment.yaml", "--only", "lora", "--set", "train.learning_rate=0.5"],
         "holds a finished run of another experiment (train.learning_rate: 0.001 there, 0.5 here)"),
    Case("compare-output-is-a-file", ["compare", "experiment.yaml", "--output", "a-file"], "--output: 'a-file' is a file"),
    Case("compare-more-processes-than-images", ["compare", "experiment.yaml", "--only", "lora", "--output", "o",
                                                 "--set", "evaluation.prompts=[a red circle]"],
         "3 processes were launched for 2 evaluation images", {"WORLD_SIZE": "3", **LAUNCHED}),
    # generate
    Case("generate-files-of-another-model", ["generate", "mixed-run", "--prompt", "a red circle", "--num-images", "1",
                                             "--steps", "1"], "mixed-run: its weight files do not fit the base model"),
    Case("generate-embedding-of-another-model", ["generate", "ti-run", "--prompt", "<zz>", "--num-images", "1", "--steps", "1"],
         "ti-run: its weight files do not fit the base model"),
    Case("generate-partial-weights-of-another-model", ["generate", "partial-run", "--prompt", "x", "--num-images", "1",
                                                       "--steps", "1"], "partial-run: its weight files do not fit"),
    Case("generate-base-model-gone", ["generate", "gone-base-run", "--prompt", "x"],
         "its base model '/no/such/base' (record.json: config.model.path) is not there any more"),
    Case("generate-base-model-now-another-family", ["generate", "moved-base-run", "--prompt", "x"],
         "was trained on a model of family sd1, but its base model"),
    Case("generate-out-is-a-file", ["generate", "runs/lora", "--prompt", "x", "--out", "a-file"], "--out: 'a-file' is a file"),
    Case("generate-not-a-run", ["generate", "notes", "--prompt", "x"], "notes is not an sdtune run folder"),
    Case("generate-record-of-another-version", ["generate", "newer-run", "--prompt", "x"], "config.model.quantization: unknown key"),
    Case("generate-unknown-technique-kind", ["generate", "unknown-kind-run", "--prompt", "x"], "technique kind 'hyper-lora'"),
    Case("generate-newer-schema", ["generate", "future-run", "--prompt", "x"], "schema_version 99 is newer"),
    # export
    Case("export-over-the-run", ["export", "runs/lora", "--merged", "--out", "runs/lora", "--overwrite"], "holds the run"),
    Case("export-over-the-output", ["export", "runs/lora", "--merged", "--out", "runs", "--overwrite"], "holds the run"),
    Case("export-over-a-folder-of-mine", ["export", "runs/lora", "--merged", "--out", "notes", "--overwrite"],
         "holds files that are not a diffusers pipeline"),
    Case("export-over-another-run", ["export", "runs/lora", "--merged", "--out", "other-run", "--overwrite"],
         "'other-run' is an sdtune run folder"),
    Case("export-second-target-bad", ["export", "runs/lora", "--merged", "--out", "merged", "--single-file",
                                      "runs/lora/unet_adapter.safetensors", "--overwrite"], "is a file of the run itself"),
    Case("export-file-exists", ["export", "runs/lora", "--single-file", "mine.safetensors"], "exists; choose another file"),
    Case("export-not-safetensors", ["export", "runs/lora", "--single-file", "a-file"], "does not end in .safetensors"),
    Case("export-merged-out-is-a-file", ["export", "runs/lora", "--merged", "--out", "a-file", "--overwrite"],
         "--out: 'a-file' is a file"),
    Case("export-files-of-another-model", ["export", "mixed-run", "--single-file", "m.safetensors"], "do not fit the base model"),
    # report
    Case("report-no-records", ["report", "notes"], "notes has no records/ folder"),
    Case("report-two-base-models", ["report", "mixed-report"], "a report compares one base model"),
    # anatomy
    Case("anatomy-nothing-there", ["anatomy", "no-such-run"], "no-such-run does not exist; give a run folder"),
    Case("anatomy-not-a-run", ["anatomy", "notes"], "notes is not an sdtune run folder"),
    Case("anatomy-unfinished-run", ["anatomy", "interrupted-run"], "the run is interrupted; finish it with"),
    Case("anatomy-unknown-technique-kind", ["anatomy", "unknown-kind-run"], "technique kind 'hyper-lora'"),
    Case("anatomy-base-of-another-family", ["anatomy", "runs/lora", "--base", "sdxl-base"],
         "runs/lora was trained on a model of family sd1, but --base 'sdxl-base' is of family sdxl"),
    Case("anatomy-base-missing", ["anatomy", "runs/lora", "--base", "./no-base"], "--base './no-base' does not exist"),
    Case("anatomy-recorded-base-gone", ["anatomy", "gone-base-run"], "is not there any more"),
    Case("anatomy-recorded-base-now-another-family", ["anatomy", "moved-base-run"], "was trained on a model of family sd1"),
    Case("anatomy-file-without-base", ["anatomy", "sdxl-lora.safetensors"], "a weights file needs its base model"),
    Case("anatomy-file-of-another-family", ["anatomy", "sdxl-lora.safetensors", "--base", "sd1-base"],
         "sdxl-lora.safetensors was trained (its metadata says so) on a model of family sdxl, but --base 'sd1-base'"),
    Case("anatomy-file-not-a-lora", ["anatomy", "mine.safetensors", "--base", "sd1-base"], "mine.safetensors has weights for"),
    Case("anatomy-not-safetensors", ["anatomy", "a-file"], "a-file is neither a run folder"),
    Case("anatomy-out-is-a-folder", ["anatomy", "runs/lora", "--out", "notes"], "--out: 'notes' is a folder"),
    Case("anatomy-out-unwritable", ["anatomy", "runs/lora", "--out", f"{UNWRITABLE}/a.json"], "--out: cannot write in '/sys'"),
    # demo
    Case("demo-output-is-a-file", ["demo", "--quick", "--output", "a-file"], "--output: 'a-file' is a file"),
    Case("demo-pretrain-over-my-folder", ["demo", "pretrain", "--out", "notes"], "holds files that are not a demo base model"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, workspace, tiny_model, tiny_data, capsys, monkeypatch):
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    before = tree_state(workspace, tiny_model, tiny_data)
    code = main(case.argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    fragments = (case.message,) if isinstance(case.message, str) else case.message
    assert len(lines) == 1 and lines[0].startswith("sdtune: error: "), err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert "Traceback" not in err
    assert tree_state(workspace, tiny_model, tiny_data) == before


def test_export_writes_nothing_when_its_second_target_is_refused(workspace, capsys):
    assert main(["export", "runs/lora", "--merged", "--out", "merged", "--single-file", "x.bin"]) == 2
    assert not (workspace / "merged").exists() and "does not end in .safetensors" in capsys.readouterr().err


def test_a_full_run_needs_no_base_model_to_be_read(workspace):
    """A full fine-tuning run is its own pipeline: its base model may be gone (the check is for runs
    whose files go onto it)."""
    from sdtune.generation import finished_run

    record, model_config, technique = finished_run(workspace / "full-run")
    assert technique.kind == "full" and model_config.path == "/no/such/base"


# -- the pieces -----------------------------------------------------------------------------------------
def test_output_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    assert check_writable_folder(tmp_path / "new" / "deeper", "--output") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # (checked, not created)
    with pytest.raises(OutputPathError, match=r"^--output: '.*file/run' lies under the file"):
        check_writable_folder(tmp_path / "file" / "run", "--output")
    with pytest.raises(OutputPathError, match=r"cannot write in '/sys' \(Permission denied\)"):
        check_writable_folder(UNWRITABLE, "--output")
    with pytest.raises(OutputPathError, match="exists; choose another file or pass --overwrite"):
        check_output_file(tmp_path / "file", "--single-file", overwrite=False)
    assert check_output_file(tmp_path / "file", "--single-file", overwrite=True) == tmp_path / "file"
    with pytest.raises(OutputPathError, match="is a folder; give a file name"):
        check_output_file(tmp_path, "--single-file", overwrite=True)


def test_overwrite_sets_the_old_run_aside_until_the_new_one_finishes(tmp_path):
    """claim → the old run beside it; a failure without a checkpoint puts it back; with a checkpoint
    both stay (the new one resumes, and drops the old when it finishes)."""
    run = tmp_path / "lora"
    (run / "weights").mkdir(parents=True)
    records.write_record(run / "record.json", {"kind": "train", "status": "finished", "technique": {}, "seeds": {}, "config": {}})
    assert claim_run_dir(run, None, overwrite=True) is True
    assert (replaced_path(run) / "record.json").exists() and not any(run.iterdir())
    (run / "logs").mkdir()
    release_run_dir(run, new=True)
    assert sorted(p.name for p in run.iterdir()) == ["record.json", "weights"] and not replaced_path(run).exists()
    claim_run_dir(run, None, overwrite=True)
    (run / "checkpoints" / "checkpoint-00000002").mkdir(parents=True)
    release_run_dir(run, new=True)
    assert (run / "checkpoints").is_dir() and (replaced_path(run) / "record.json").exists()


def test_a_finished_run_reused_by_compare_is_compared_key_by_key(workspace):
    experiment = load_experiment("experiment.yaml")
    record = records.read_record(workspace / "runs" / "lora")
    assert preflight.reuse_mismatch(record, experiment, "lora") is None
    neutral = load_experiment("experiment.yaml", ["train.log_every=1", "data.num_workers=0", "evaluation.seeds_per_prompt=1"])
    assert preflight.reuse_mismatch(record, neutral, "lora") is None
    changed = load_experiment("experiment.yaml", ["techniques.lora.rank=8"])
    assert preflight.reuse_mismatch(record, changed, "lora") == "techniques.lora.r: 4 there, 8 here"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["train", "experiment.yaml", "--technique", "lora"], {"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but"),
        (["generate", "mixed-run", "--prompt", "x", "--steps", "1", "--num-images", "1"], {}, "do not fit the base model"),
        (["train", "experiment.yaml", "--technique", "lora", "--overwrite", "--set", "data.source=./broken"], {},
         "data.source: no captions found"),
    ],
)
def test_as_a_user_runs_it_the_whole_stderr_is_one_line(argv, env, message, workspace, tiny_model):
    """In a fresh process the libraries' own output (warnings, loggers) reaches the terminal too."""
    before = tree_state(workspace)
    result = subprocess.run([sys.executable, "-m", "sdtune", *argv], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=workspace)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert tree_state(workspace) == before


def test_an_unreadable_latent_cache_entry_is_encoded_again_not_a_crash(tmp_path, caplog):
    from sdtune.data.cache import open_cache

    cache = open_cache("k", "disk", tmp_path, caches_texts=False, description={})
    mean, std = torch.ones(4, 2, 2), torch.full((4, 2, 2), 0.5)
    cache.put_posterior(3, False, mean, std)
    entry = tmp_path / "k" / "00000003-orig.safetensors"
    entry.write_bytes(entry.read_bytes()[:40])  # cut short
    assert cache.has_posterior(3, False) and cache.posterior(3, False) is None  # → the loop encodes it again
    assert "unreadable" in caplog.text
    cache.put_posterior(3, False, mean, std)  # (replaced whole, atomically)
    assert all(torch.equal(a, b) for a, b in zip(cache.posterior(3, False), (mean, std)))

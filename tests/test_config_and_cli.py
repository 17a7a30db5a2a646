"""Presets and flags: overrides land in the right section, mistakes are errors, --help lists the keys."""

import subprocess
import sys

import pytest
from conftest import REPO, SCRIPTS

from gigavideo.config import ConfigError, load_config


def test_flag_overrides_its_stage_section_then_model_with_types_kept():
    cfg = load_config("tiny", "render", {"steps": "8", "dtype": "bfloat16", "train.lr": 0.5, "model_path": "/m"})
    assert cfg.render.steps == 8 and isinstance(cfg.render.steps, int)
    assert cfg.model.dtype == "bfloat16" and cfg.train.lr == 0.5 and cfg.model.path == "/m"


def test_unknown_flag_and_unknown_preset_are_errors():
    with pytest.raises(ConfigError, match="--stepz"):
        load_config("tiny", "render", {"stepz": 3})
    with pytest.raises(ConfigError, match="presets:.*tiny"):
        load_config("nonexistent", "render")
    with pytest.raises(ConfigError, match="expected a number"):
        load_config("tiny", "render", {"steps": "many"})


def test_paper_preset_is_the_paper_setting():
    cfg = load_config("wan2.1-t2v-1.3b", "train")
    assert (cfg.render.width, cfg.render.height, cfg.render.num_frames, cfg.render.fps) == (832, 480, 81, 16)
    assert cfg.train.lr == 1e-6 and (cfg.train.batch_size, cfg.train.epochs, cfg.train.max_steps) == (4, 1.0, 0)
    assert cfg.model.kind == "wan"


HELP_ALL = """
import inspect, runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    print(f"=== {script}", flush=True)
    try:
        main = runpy.run_path(script, run_name="__main__")["main"]
    except SystemExit as exit:
        if exit.code:
            sys.exit(f"{script} --help exited {exit.code}")
    print("ACCEPTS", *inspect.signature(main).parameters, flush=True)
"""
USER_SCRIPTS = sorted(
    {str(REPO / s) for s in SCRIPTS.values()}
    | {str(p) for d in ("bench", "scripts", "eval") for p in (REPO / d).glob("*.py")}
)


def test_every_script_has_a_help_that_lists_exactly_the_flags_it_accepts():
    """Each script's --help, all in one process (the imports, not the help, cost seconds): its own flags (main's
    parameters), and the config keys where main takes them (**overrides): rounds.py lists no --overwrite."""
    out = subprocess.run(
        [sys.executable, "-c", HELP_ALL, *USER_SCRIPTS], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    helps = out.stdout.split("=== ")[1:]
    assert [h.split("\n", 1)[0] for h in helps] == USER_SCRIPTS
    for script, text in zip(USER_SCRIPTS, helps, strict=True):
        text, accepts = text.rsplit("ACCEPTS", 1)
        params = accepts.split()
        listed = [line.split("=", 1)[0][4:] for line in text.splitlines() if line.startswith("  --")]
        takes_keys = "overrides" in params or "train_flags" in params
        own = [p for p in params if p not in ("overrides", "train_flags")]
        if takes_keys:
            assert listed[: len(own) + 1] == [*own, "KEY"] and "[model] keys" in text, script
        else:
            assert listed == own, script
    rounds = helps[USER_SCRIPTS.index(str(REPO / "eval/rounds.py"))]
    assert "--rounds=" in rounds and "--overwrite" not in rounds
    assert "--overwrite" in helps[USER_SCRIPTS.index(str(REPO / SCRIPTS["stage4"]))]
    assert "--model_path" not in out.stderr


def test_a_boolean_is_true_or_false_and_nothing_else():
    import fire

    from gigavideo.cli import checked_flags

    for given, meant in (("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("NO", False)):
        assert load_config("tiny", "render", {"vae_slicing": given}).render.vae_slicing is meant
    for given in ("on", "flase", "2", ""):
        with pytest.raises(ConfigError, match=f"--vae_slicing='{given}': must be true or false"):
            load_config("tiny", "render", {"vae_slicing": given})

    def main(overwrite: bool = False, rounds: int = 2, **overrides):
        return overwrite, rounds

    # fire passes --overwrite=false on as the text 'false', which is true: a stage would have overwritten
    assert fire.Fire(checked_flags(main), command=["--overwrite=false"]) == (False, 2)
    assert fire.Fire(checked_flags(main), command=["--overwrite"]) == (True, 2)
    with pytest.raises(ConfigError, match="--overwrite='flase': must be true or false"):
        fire.Fire(checked_flags(main), command=["--overwrite=flase"])
    with pytest.raises(ConfigError, match="--rounds='many': must be a number"):
        fire.Fire(checked_flags(main), command=["--rounds=many"])


def test_a_table_flag_changes_only_the_entries_it_names_and_so_does_a_preset_that_extends(tmp_path):
    tiny = load_config("tiny", "render").model.arch_transformer
    cfg = load_config("tiny", "render", {"model.arch_transformer": {"num_layers": 4}})
    assert cfg.model.arch_transformer == tiny | {"num_layers": 4}
    (tmp_path / "deeper.toml").write_text('extends = "tiny"\n[model]\narch_transformer = { num_layers = 3 }\n')
    assert load_config(str(tmp_path / "deeper.toml"), "render").model.arch_transformer == tiny | {"num_layers": 3}


def test_a_short_flag_that_names_keys_of_two_sections_is_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"--dtype matches score\.dtype and model\.dtype: name one"):
        load_config("tiny", "score", {"dtype": "float32"})
    assert load_config("tiny", "score", {"score.dtype": "bfloat16"}).score.dtype == "bfloat16"
    assert load_config("tiny", "render", {"dtype": "bfloat16"}).model.dtype == "bfloat16"  # render has none
    with pytest.raises(ConfigError, match="grad_accum is retired"):
        load_config("tiny", "train", {"grad_accum": 2})


def test_presets_list_only_what_differs_from_the_documented_defaults():
    import tomllib

    from gigavideo.config import PRESETS_DIR, defaults, docs, read_preset, resolve_preset

    for path in sorted(PRESETS_DIR.glob("*.toml")):
        raw = tomllib.loads(path.read_text())
        parent = raw.pop("extends", None)  # a preset that extends another lists only what differs from it
        inherited = read_preset(resolve_preset(parent)) if parent else {}
        for section, table in raw.items():
            same = [k for k, v in table.items() if inherited.get(section, defaults(section)).get(k) == v]
            assert not same, f"{path.name} [{section}] repeats defaults or its parent's values: {same}"
    assert not tomllib.loads((PRESETS_DIR / "wan2.1-t2v-1.3b.toml").read_text())  # the paper setting is the default
    for section in ("model", "prompts", "render", "score", "train", "eval", "toy"):
        assert all(docs(section).values()), f"[{section}] has keys without a doc"


def test_an_unknown_key_in_a_preset_is_an_error_naming_it(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text("[render]\nstepz = 8\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(str(preset), "render")
    preset.write_text("[rendr]\nsteps = 8\n")
    with pytest.raises(ConfigError, match="rendr"):
        load_config(str(preset), "render")


def test_a_preset_extends_another_and_its_own_keys_win(tmp_path):
    (tmp_path / "child.toml").write_text('extends = "tiny"\n[render]\nsteps = 7\n[model]\nfamily = "wan2.2-a14b"\n')
    cfg = load_config(str(tmp_path / "child.toml"), "render")
    assert cfg.render.steps == 7 and cfg.render.height == 64 and cfg.model.kind == "tiny"  # tiny's, kept
    assert cfg.model.family == "wan2.2-a14b" and cfg.train.save_every == 3
    (tmp_path / "a.toml").write_text(f'extends = "{tmp_path / "b.toml"}"\n')
    (tmp_path / "b.toml").write_text(f'extends = "{tmp_path / "a.toml"}"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.toml"), "render")


def test_the_configuration_reference_is_generated_from_the_typed_config_and_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "config_reference.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    reference = (REPO / "docs" / "config.md").read_text()
    for name in ("model", "prompts", "render", "score", "train", "eval", "toy"):
        assert f"## [{name}]" in reference
    assert "| `batch_size` | `4` | >= 1 |" in reference  # a key, its default and its range


def test_the_readme_example_preset_loads(tmp_path):
    """The cluster preset the README shows a newcomer is a valid preset (docs that cannot go stale)."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    preset = tmp_path / "my-run.toml"
    preset.write_text("\n".join(line.strip() for line in block.splitlines()))
    cfg = load_config(str(preset), "score")
    assert cfg.model.path.startswith("/models/") and cfg.score.judge_path.startswith("/models/")
    assert cfg.render.height == 480 and cfg.render.num_frames == 81  # the paper's setting, from `extends`


def test_a_stale_extension_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A stage killed while DeepSpeed JIT-builds its CPU op leaves a lock that torch waits on forever."""
    import json
    import os
    import time

    from gigavideo.distributed import clear_stale_build_lock
    from gigavideo.rundir.locks import _start_time, this_process

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    assert not clear_stale_build_lock("deepspeed_shm_comm")  # no lock: nothing to do
    lock.write_text("")
    assert not clear_stale_build_lock("deepspeed_shm_comm") and lock.exists()  # a build may be running
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_build_lock("deepspeed_shm_comm") and not lock.exists()

    # A stage 4 recorded beside the lock: while it lives the lock is kept (a line says so), once it is gone the
    # lock goes at once, whatever its age.
    users = tmp_path / "deepspeed_shm_comm" / "gigavideo-users"
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {**this_process(), "pid": builder.pid, "pid_start": _start_time(builder.pid)}
        (users / f"{record['host']}-{builder.pid}.json").write_text(json.dumps(record))
        lock.write_text("")
        assert not clear_stale_build_lock("deepspeed_shm_comm") and lock.exists()
    finally:
        builder.kill()
        builder.wait()
    assert clear_stale_build_lock("deepspeed_shm_comm") and not lock.exists()
    assert [p.name for p in users.iterdir()] == [f"{record['host']}-{os.getpid()}.json"]  # this process's own


def test_the_scripts_a_user_runs_beside_the_stages_answer_a_user_error_in_one_line(tmp_path):
    """A stage folder given as the run directory, a preset that does not exist, a boolean that is not one."""
    cases = [
        (["scripts/check_shards.py", str(tmp_path / "stage2")], f"--run_dir={tmp_path} --stage=stage2"),
        (["bench/memory_plan.py", "--preset=nope"], "config preset 'nope' not found"),
        (["bench/memory_plan.py", "--json=maybe"], "--json='maybe': must be true or false"),
    ]
    (tmp_path / "stage2").mkdir()
    for args, message in cases:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
        assert message in errors[0], errors[0]

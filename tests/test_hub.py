"""Hub repo ids as MODEL: offline resolution from a Hugging Face cache built here (no network, ever)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1v_quant.model.checkpoint import INDEX_NAME, open_checkpoint
from r1v_quant.util.errors import CheckpointError, R1VError
from r1v_quant.util.hub import (
    IGNORE_PATTERNS,
    METADATA_PATTERNS,
    WEIGHT_PATTERNS,
    hub_source,
    is_repo_id,
    model_name,
    resolve_model,
    split_revision,
)

REPO = "Skyworkish/Tiny-R1V"
SHA_MAIN = "a" * 40
SHA_V1 = "b" * 40
CARD = "---\nlicense: mit\ntags:\n- multimodal\n---\n# Tiny R1V\n"


def add_snapshot(cache: Path, repo: str, src: Path, sha: str, refs: tuple[str, ...] = ()) -> Path:
    """Lay out `src` as huggingface_hub does: blobs by content hash, snapshot files as relative symlinks."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / sha
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    for ref in refs:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture(scope="module")
def hf_home(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME with REPO cached twice: main (the replica + a card) and branch v1 (a marked config)."""
    home = tmp_path_factory.mktemp("hf_home")
    src = tmp_path_factory.mktemp("src") / "tiny"
    shutil.copytree(tiny_dir, src)
    (src / "README.md").write_text(CARD)
    add_snapshot(home / "hub", REPO, src, SHA_MAIN, refs=("main",))
    cfg = json.loads((src / "config.json").read_text())
    cfg["_r1v_test_marker"] = "v1"
    (src / "config.json").write_text(json.dumps(cfg))
    add_snapshot(home / "hub", REPO, src, SHA_V1, refs=("v1",))
    return home


@pytest.fixture
def offline_home(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def _snap(home: Path, sha: str) -> Path:
    return home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / sha


def test_repo_id_shapes() -> None:
    assert is_repo_id("Skywork/Skywork-R1V-38B") and is_repo_id("org/name.v2_x")
    for not_id in ("./a/b", "../a/b", "/abs/path", "a/b/c", "a", "a/../b", "~/x", "a--b/c", "a/", "a/m.gguf"):
        assert not is_repo_id(not_id), not_id


def test_hit_resolves_to_snapshot_and_reads_through_blob_links(offline_home: Path, tiny_dir: Path) -> None:
    path = resolve_model(REPO)
    assert path.resolve() == _snap(offline_home, SHA_MAIN).resolve()
    assert hub_source(path).repo_id == REPO and hub_source(path).commit == SHA_MAIN
    assert model_name(path) == "Tiny-R1V"
    assert os.path.islink(path / INDEX_NAME)  # the files really are links into blobs/
    ckpt, ref = open_checkpoint(path), open_checkpoint(tiny_dir)
    name = "language_model.model.layers.0.mlp.down_proj.weight"
    assert torch.equal(ckpt.get(name), ref.get(name))


def test_hf_hub_cache_variable_is_honoured(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(hf_home / "elsewhere"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(REPO).resolve() == _snap(hf_home, SHA_MAIN).resolve()


def test_revision_as_branch_and_as_commit(offline_home: Path) -> None:
    v1 = resolve_model(REPO, "v1")
    assert json.loads((v1 / "config.json").read_text())["_r1v_test_marker"] == "v1"
    assert hub_source(v1).commit == SHA_V1
    assert resolve_model(REPO, SHA_MAIN).resolve() == _snap(offline_home, SHA_MAIN).resolve()
    assert resolve_model(REPO, SHA_V1).resolve() == v1.resolve()
    with pytest.raises(R1VError, match=r"revision nope\).*HF_HUB_OFFLINE"):
        resolve_model(REPO, "nope")


def test_miss_is_a_clear_error(offline_home: Path) -> None:
    with pytest.raises(R1VError) as e:
        resolve_model("Skyworkish/Not-Cached")
    msg = str(e.value)
    assert "Skyworkish/Not-Cached" in msg and "not in the Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE" in msg and str(offline_home / "hub") in msg


def test_local_path_wins_and_takes_no_revision(
    offline_home: Path, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "Skyworkish").mkdir()
    os.symlink(tiny_dir, tmp_path / REPO)  # a local directory spelled exactly like the repo id
    monkeypatch.chdir(tmp_path)
    assert resolve_model(REPO) == Path(REPO)
    with pytest.raises(R1VError, match="local path"):
        resolve_model(REPO, "v1")
    assert resolve_model("missing/dir/deeper") == Path("missing/dir/deeper")  # left to the command


def test_metadata_only_snapshot(offline_home: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """What `inspect` leaves behind: config + index, no shards. Enough for inspect, not for weights."""
    src = tmp_path / "meta"
    src.mkdir()
    for f in tiny_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, src / f.name)
    add_snapshot(offline_home / "hub", "Skyworkish/Meta-Only", src, "c" * 40, refs=("main",))
    assert (resolve_model("Skyworkish/Meta-Only", weights=False) / "config.json").is_file()
    with pytest.raises(R1VError, match=r"lacks 4 weight shard\(s\).*network"):
        resolve_model("Skyworkish/Meta-Only")


def test_only_data_files_are_requested(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The patterns sent to snapshot_download, applied by huggingface_hub's own filter to a real listing."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    listing = [
        ".gitattributes", "README.md", "LICENSE", "config.json", "generation_config.json",
        "model-00001-of-00016.safetensors", "model-00016-of-00016.safetensors", INDEX_NAME,
        "configuration_skywork_chat.py", "modeling_skywork_chat.py", "conversation.py",
        "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
        "special_tokens_map.json", "chat_template.jinja", "preprocessor_config.json",
        "pytorch_model-00001-of-00016.bin", "training_args.bin", "optimizer.pt", "rng.pth", "state.pkl",
        "model.gguf", "imgs/architecture.png", "eval/results.json",
    ]  # fmt: skip
    calls: list[dict] = []

    def fake(repo_id: str, **kw: object) -> str:
        calls.append(kw)
        kept = list(filter_repo_objects(listing, allow_patterns=kw["allow_patterns"],
                                        ignore_patterns=kw["ignore_patterns"]))  # fmt: skip
        kw["kept"] = kept
        snap = tmp_path / "snap"
        snap.mkdir(exist_ok=True)
        (snap / "config.json").touch()  # so the checkpoint checks pass
        (snap / "model.safetensors").touch()
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    resolve_model("Skywork/Skywork-R1V-38B", "main")
    resolve_model("Skywork/Skywork-R1V-38B", weights=False)
    full, meta = calls
    assert full["local_files_only"] is False and full["revision"] == "main"
    assert Path(full["cache_dir"]) == tmp_path / "cache"
    assert set(full["kept"]) == {
        "README.md", "LICENSE", "config.json", "generation_config.json", "model-00001-of-00016.safetensors",
        "model-00016-of-00016.safetensors", INDEX_NAME, "configuration_skywork_chat.py",
        "modeling_skywork_chat.py", "conversation.py", "tokenizer.json", "tokenizer_config.json",
        "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "chat_template.jinja",
        "preprocessor_config.json",
    }  # fmt: skip
    assert set(full["kept"]) - set(meta["kept"]) == {
        "model-00001-of-00016.safetensors",
        "model-00016-of-00016.safetensors",
    }
    assert not set(WEIGHT_PATTERNS) & set(METADATA_PATTERNS) and "*.bin" in IGNORE_PATTERNS


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "r1v_quant.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_cli_takes_repo_ids(hf_home: Path) -> None:
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_home / "hub")}
    r = _cli("inspect", REPO, "--revision", "v1", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["flavor"] == "r1v"
    r = _cli("inspect", "Skyworkish/Not-Cached", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not in the Hugging Face cache" in r.stderr


# -- shard paths that leave the model directory -------------------------------------------------------------
def _with_shard_name(src: Path, dst: Path, shard: str) -> None:
    shutil.copytree(src, dst, symlinks=True)
    idx = json.loads((src / INDEX_NAME).read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = shard
    (dst / INDEX_NAME).unlink()
    (dst / INDEX_NAME).write_text(json.dumps(idx))


@pytest.mark.parametrize(
    "shard", ["../outside.safetensors", "/etc/outside.safetensors", "a/../../x.safetensors"]
)
def test_index_escaping_the_directory_is_refused(tiny_dir: Path, tmp_path: Path, shard: str) -> None:
    (tmp_path / "outside.safetensors").write_bytes(
        (tiny_dir / "model-00001-of-00004.safetensors").read_bytes()
    )
    _with_shard_name(tiny_dir, tmp_path / "m", shard)
    with pytest.raises(CheckpointError, match=r"outside the model directory: .*\(refused\)"):
        open_checkpoint(tmp_path / "m")


def test_symlinked_shard_pointing_outside_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "m")
    shard = tmp_path / "m" / "model-00001-of-00004.safetensors"
    shutil.move(shard, tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="model-00001-of-00004.safetensors' \\(refused\\)"):
        open_checkpoint(tmp_path / "m")


def test_cache_snapshot_may_only_link_into_its_own_blobs(offline_home: Path, tmp_path: Path) -> None:
    snap = resolve_model(REPO)
    shutil.copytree(snap.parent.parent, tmp_path / "models--Org--Other", symlinks=True)
    other = tmp_path / "models--Org--Other" / "snapshots" / SHA_MAIN
    assert open_checkpoint(other).names()  # a complete copy of the repo reads fine
    shard = other / "model-00001-of-00004.safetensors"
    shard.unlink()
    shard.symlink_to((snap / "model-00001-of-00004.safetensors").resolve())  # another repo's blob
    with pytest.raises(CheckpointError, match="refused"):
        open_checkpoint(other)


def test_decorators_hand_commands_a_local_path(offline_home: Path) -> None:
    import click
    from click.testing import CliRunner

    from r1v_quant.cli.main import Group
    from r1v_quant.cli.params import model_argument, model_option

    seen: list[object] = []

    @click.command("arg")
    @model_argument(weights=False)
    @click.option("--json", "as_json", is_flag=True)
    def arg(model: Path, as_json: bool) -> None:
        seen.append(model)

    @click.command("opt")
    @model_option("--model", "-m")
    def opt(model: Path | None) -> None:
        seen.append(model)

    group = Group(commands={"arg": arg, "opt": opt})
    runner = CliRunner()
    for args in (["arg", REPO, "--revision", "v1", "--json"], ["opt", "-m", REPO], ["opt"]):
        r = runner.invoke(group, args)
        assert r.exit_code == 0, r.output
    assert [hub_source(p).commit if p else None for p in seen] == [SHA_V1, SHA_MAIN, None]  # type: ignore[union-attr]
    r = runner.invoke(group, ["opt", "--revision", "v1"])
    assert r.exit_code == 2 and "no model repo id given" in r.output


# -- repo ids in eval / check / plan / profile / chat -------------------------------------------------------
NOISY = "Skyworkish/Tiny-R1V-Noisy"


@pytest.fixture(scope="module")
def noisy_repo(hf_home: Path, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second cached repo: the replica with noise on lm_head (a stand-in for a quantized release)."""
    from eval_helpers import perturbed_copy

    src = perturbed_copy(tiny_dir, tmp_path_factory.mktemp("noisy") / "noisy", noise=0.5)
    add_snapshot(hf_home / "hub", NOISY, src, "d" * 40, refs=("main",))
    return NOISY


def test_revision_suffix_picks_the_snapshot(offline_home: Path, tmp_path: Path, monkeypatch) -> None:
    assert split_revision(f"{REPO}@v1") == (REPO, "v1")
    assert split_revision(f"{REPO}@refs/pr/1") == (REPO, "refs/pr/1")
    for plain in (REPO, f"{REPO}@", "./a/b@v1", "a/b/c@v1", "x.gguf@v1"):
        assert split_revision(plain) == (plain, None)
    assert hub_source(resolve_model(f"{REPO}@v1")).commit == SHA_V1
    assert hub_source(resolve_model(f"{REPO}@{SHA_MAIN}")).commit == SHA_MAIN
    assert hub_source(resolve_model(f"{REPO}@v1", "v1")).commit == SHA_V1  # the same one twice is fine
    with pytest.raises(R1VError, match="two revisions"):
        resolve_model(f"{REPO}@v1", "main")
    with pytest.raises(R1VError, match=r"revision nope\).*HF_HUB_OFFLINE"):
        resolve_model(f"{REPO}@nope")
    # a local folder whose name contains @ is a folder
    (tmp_path / "Skyworkish").mkdir()
    os.symlink(_snap(offline_home, SHA_MAIN), tmp_path / f"{REPO}@v1")
    monkeypatch.chdir(tmp_path)
    assert resolve_model(f"{REPO}@v1") == Path(f"{REPO}@v1")


def test_repo_without_config_is_not_a_checkpoint(offline_home: Path, tmp_path: Path) -> None:
    """A GGUF-only repository: a clear error pointing at local GGUF files, not a missing-weights one."""
    src = tmp_path / "gguf-repo"
    src.mkdir()
    (src / "README.md").write_text(CARD)
    add_snapshot(offline_home / "hub", "Skyworkish/Tiny-R1V-GGUF", src, "e" * 40, refs=("main",))
    with pytest.raises(R1VError, match="no config.json in the repository.*local file"):
        resolve_model("Skyworkish/Tiny-R1V-GGUF")


def _ppl_args(ref: str, *cands: str) -> list[str]:
    out = ["eval", "ppl", "--ref", ref, "--set", "heldout", "--n-text", "1", "--n-image", "1", "--json"]
    for c in cands:
        out += ["--cand", c]
    return out


def test_eval_ppl_takes_repo_ids(offline_home: Path, noisy_repo: str, tiny_dir: Path) -> None:
    """--ref REPO --cand REPO2 --cand REPO@v1: each resolved from the cache, measured on the replica."""
    from click.testing import CliRunner

    from r1v_quant.cli.main import main

    res = CliRunner().invoke(main, _ppl_args(REPO, noisy_repo, f"{REPO}@v1", str(tiny_dir)))
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    ref, (noisy, same, local) = rep["reference"], rep["candidates"]
    assert Path(ref["path"]).resolve() == _snap(offline_home, SHA_MAIN).resolve()
    assert hub_source(noisy["path"]).repo_id == NOISY and hub_source(same["path"]).commit == SHA_V1
    names = (ref["artifact"], noisy["artifact"], same["artifact"])
    assert names == ("Tiny-R1V", "Tiny-R1V-Noisy", "Tiny-R1V-2")  # snapshot dirs named after the repo
    assert noisy["kinds"]["all"]["kld_mean"] > 1e-4  # the noisy repo's weights were really used
    for c in (same, local):  # the same weights through a revision and through a local path
        assert c["kinds"]["all"]["kld_max"] < 1e-9
        assert c["kinds"]["all"]["tokens"] == noisy["kinds"]["all"]["tokens"] > 0


def test_eval_and_check_miss_is_one_line_exit_2(hf_home: Path, offline_home: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from r1v_quant.cli.main import main

    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_home / "hub")}
    real = _cli(*_ppl_args(REPO, "Skyworkish/Not-Cached"), env=env)  # the installed CLI, in a process
    assert real.returncode == 2 and "Traceback" not in real.stderr
    assert real.stderr.strip().splitlines() == [
        f"error: Skyworkish/Not-Cached: not a local directory and not in the Hugging Face cache at "
        f"{hf_home / 'hub'}, and downloads are off (HF_HUB_OFFLINE is set). Run once with network access "
        "(unset HF_HUB_OFFLINE) or pass a local directory"
    ]
    out = tmp_path / "rep"
    runs = {
        "bad revision": (_ppl_args(f"{REPO}@nope", REPO), f"{REPO} (revision nope): not a local directory"),
        "check": (
            ["check", "--ref", "Skyworkish/Not-Cached", "--cand", REPO, "--out", str(out)],
            "Skyworkish/Not-Cached: not a local directory and not in the Hugging Face cache",
        ),
        "missing gguf": (_ppl_args(REPO, str(tmp_path / "m.gguf")), "m.gguf: no such model"),  # never a repo
    }
    for what, (args, want) in runs.items():
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (what, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], (what, lines)
    assert not out.exists()


def test_plan_takes_a_repo_id_with_metadata_only(offline_home: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """`plan --model REPO` needs config + index only: it works on a snapshot without shards, offline."""
    from click.testing import CliRunner

    from r1v_quant.cli.main import main

    src = tmp_path / "meta"
    src.mkdir()
    for f in tiny_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, src / f.name)
    add_snapshot(offline_home / "hub", "Skyworkish/Plan-Meta", src, "f" * 40, refs=("main",))
    plans = {}
    for label, args in {
        "local": ["--model", str(tiny_dir)],
        "repo": ["--model", REPO, "--revision", "v1"],
        "meta": ["--model", "Skyworkish/Plan-Meta@main"],
    }.items():
        res = CliRunner().invoke(main, ["plan", *args, "--device", "cpu:8GB", "--ctx", "512", "--json"])
        assert res.exit_code == 0, (label, res.output)
        plans[label] = json.loads(res.output)
    assert hub_source(plans["repo"]["model"]["path"]).commit == SHA_V1
    assert hub_source(plans["meta"]["model"]["path"]).repo_id == "Skyworkish/Plan-Meta"
    assert plans["repo"]["devices"] == plans["local"]["devices"]  # the same model, the same plan
    local, repo, meta = (p["model"] for p in plans.values())
    assert {**repo, "path": None} == {**local, "path": None}
    assert meta["geometry"] == local["geometry"] and meta["llm_format"] == local["llm_format"]
    # without shards, the bytes come from the shapes at the config's 16-bit type: within headers of the files
    assert meta["stored"].keys() == local["stored"].keys()
    for comp, n in local["stored"].items():
        assert meta["stored"][comp] == pytest.approx(n, rel=0.01), comp
    bad = CliRunner().invoke(main, ["plan", "--model", "Skyworkish/Not-Cached", "--device", "cpu:8GB"])
    assert bad.exit_code == 2 and "not in the Hugging Face cache" in bad.output


def test_profile_and_chat_resolve_their_model(offline_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring only (both commands run models for minutes): they receive the snapshot directory."""
    from click.testing import CliRunner

    import r1v_quant.profiling.profiler
    import r1v_quant.runtime.engines
    from r1v_quant.cli.main import main

    seen: list[Path] = []

    def stop(path: Path) -> None:
        seen.append(path)
        raise R1VError("stopped here")

    monkeypatch.setattr(r1v_quant.profiling.profiler, "profile", lambda path, **kw: stop(path))
    monkeypatch.setattr(r1v_quant.runtime.engines, "open_engines", lambda **kw: stop(kw["model"]))
    runner = CliRunner()
    for args in (["profile", f"{REPO}@v1"], ["chat", "--model", REPO, "--revision", "v1", "-p", "hi"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 2 and "stopped here" in res.output, res.output
    assert [hub_source(p).commit for p in seen] == [SHA_V1, SHA_V1]


def test_update_cards_never_writes_into_the_hub_cache(offline_home: Path, tmp_path: Path) -> None:
    from r1v_quant.evaluate.check import card_rows

    snap = resolve_model(REPO)
    local = tmp_path / "local"
    local.mkdir()
    (local / "README.md").write_text(CARD)
    row = {"size_bytes": 1, "ppl_ratio": 1.0, "kld_mean": 0.0, "top1_pct": 100.0, "bench_delta": None}
    rows = [{**row, "artifact": "hub", "path": str(snap)}, {**row, "artifact": "local", "path": str(local)}]
    assert list(card_rows({"rows": rows})) == [local]

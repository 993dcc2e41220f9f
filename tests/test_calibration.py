"""Calibration pipeline on the tiny replica: sets, rendering, masks, statistics, spilling, bad input."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from r1v_quant.calibration import (
    MODALITIES,
    ActivationStore,
    CalibrationStats,
    CalibrationWarning,
    LayerStats,
    Renderer,
    build_default_set,
    calibrate,
    iter_layers,
    load_set,
    parse_size,
    prepare,
    write_set,
)
from r1v_quant.calibration.render import PROMPT, RESPONSE, VISION
from r1v_quant.calibration.sensitivity import (
    SENSITIVITY_FILE,
    SENSITIVITY_SAMPLES,
    Sensitivity,
    modality_sensitivities,
    read_sensitivity,
    sensitivity_subset,
    write_sensitivity,
)
from r1v_quant.data.synthdata import render_shape
from r1v_quant.model.checkpoint import open_checkpoint
from r1v_quant.model.reference import R1VModel
from r1v_quant.util.errors import R1VError

SAMPLES, SEQ = 4, 512


@pytest.fixture(scope="module")
def runs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same calibration twice: all in RAM, and with a 1 KB budget so every activation spills."""
    base = tmp_path_factory.mktemp("calib")
    out = {"ram": base / "ram", "spill": base / "spill"}
    calibrate(tiny_dir, "default", SAMPLES, SEQ, out["ram"], None, seed=0, progress=False)
    calibrate(tiny_dir, "default", SAMPLES, SEQ, out["spill"], "1KB", seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def prepared(tiny_dir: Path):
    return prepare(tiny_dir, "default", SAMPLES, SEQ, seed=0, progress=False)


# -- sets --------------------------------------------------------------------------------------------------
def test_default_set_is_deterministic_and_mixed() -> None:
    a = build_default_set(8, seed=3, text_ratio=0.25, seq_len=1024)
    b = build_default_set(8, seed=3, text_ratio=0.25, seq_len=1024)
    assert a.content_hash() == b.content_hash() and a.manifest_text() == b.manifest_text()
    assert build_default_set(8, seed=4, seq_len=1024).content_hash() != a.content_hash()
    assert sum(1 for s in a.samples if not s.images) == 2  # round(8 * 0.25) text-only
    for s in a.samples:
        reply = s.turns[-1]
        assert (
            reply.role == "assistant"
            and reply.content.startswith("<think>\n")
            and "</think>" in reply.content
        )
    assert len({s.id.split("-", 1)[1] for s in a.samples if s.images}) >= 4  # several image kinds


def test_default_set_without_skimage(monkeypatch: pytest.MonkeyPatch) -> None:
    from r1v_quant.calibration import default_set

    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    assert default_set.available_photos() == []
    s = build_default_set(10, seed=0, text_ratio=0.0, seq_len=512)
    assert len(s) == 10 and not any("photo" in x.id for x in s.samples)


def test_written_set_reloads_with_the_same_hash(tmp_path: Path) -> None:
    a = build_default_set(3, seed=1, seq_len=512)
    write_set(a, tmp_path / "set")
    b = load_set(str(tmp_path / "set"), samples=3, seq_len=512)
    assert b.content_hash() == a.content_hash()
    (tmp_path / "set" / a.image_keys()[0]).write_bytes(b"changed")  # image bytes are part of the identity
    assert load_set(str(tmp_path / "set"), samples=3, seq_len=512).content_hash() != a.content_hash()


def _png(color: str = "red") -> bytes:
    buf = io.BytesIO()
    render_shape(color, "square").save(buf, format="PNG")
    return buf.getvalue()


def test_tsv_and_text_loaders(tmp_path: Path) -> None:
    img = base64.b64encode(_png()).decode()
    tsv = tmp_path / "bench.tsv"
    tsv.write_text(
        "index\timage\tquestion\tanswer\tA\tB\n"
        f"0\t{img}\tWhat colour is the square?\tA\tred\tblue\n"
        "1\t0\tIs it a square?\tyes\t\t\n",  # image "0": VLMEvalKit's reference to row 0's image
        encoding="utf-8",
    )
    s = load_set(str(tsv), samples=2, seq_len=512)
    assert [x.id for x in s.samples] == ["tsv-0", "tsv-1"]
    q0 = s.samples[0].turns[0]
    assert "Options:\nA. red\nB. blue" in q0.content and s.samples[0].turns[1].content == "A"
    assert s.image_bytes(q0.images[0]) == _png() == s.image_bytes(s.samples[1].turns[0].images[0])
    txt = tmp_path / "notes.txt"
    txt.write_text("\n\n".join(f"Paragraph {k} " + "word " * 200 for k in range(10)), encoding="utf-8")
    with pytest.warns(CalibrationWarning, match="fewer than --samples 100"):
        t = load_set(str(txt), samples=100, seq_len=256)
    assert len(t) > 1 and all(len(x.turns) == 1 and x.turns[0].role == "user" for x in t.samples)


def test_hf_datasets_loader_on_a_local_file(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    from r1v_quant.calibration.loaders import load_hf_dataset

    data = tmp_path / "rows.jsonl"
    data.write_text(
        json.dumps({"question": "What is 2 + 3?", "answer": "<think>\n2+3=5\n</think>\n\n5"}) + "\n"
    )
    s = load_hf_dataset("json", split="train", data_files=str(data))
    assert len(s) == 1 and s.samples[0].turns[-1].content.endswith("5")


def test_dataset_rows_become_samples() -> None:
    """The row mapping behind hf:... (checked without `datasets`): ShareGPT chats and question/answer rows."""
    from r1v_quant.calibration.loaders import rows_to_set

    img = render_shape("blue", "circle")
    rows = [
        {
            "id": "a",
            "image": img,
            "conversations": [
                {"from": "human", "value": "What shape?"},
                {"from": "gpt", "value": "A circle."},
            ],
        },
        {"question": "What is 2 + 2?", "answer": "4"},
    ]
    s = rows_to_set(rows, "hf:test")
    chat = s.samples[0].turns
    assert [t.role for t in chat] == ["user", "assistant"] and len(chat[0].images) == 1
    assert Image.open(io.BytesIO(s.image_bytes(chat[0].images[0]))).size == img.size
    assert [t.content for t in s.samples[1].turns] == ["What is 2 + 2?", "4"]


# -- rendering and masks -----------------------------------------------------------------------------------
def test_modality_masks(tiny_dir: Path, prepared) -> None:
    spec = prepared.ckpt.spec
    tok = prepared.renderer.tok
    assert any(r.image_keys for r in prepared.rendered) and any(not r.image_keys for r in prepared.rendered)
    for r in prepared.rendered:
        ids, mod = r.input_ids, r.modality
        assert torch.equal(mod == VISION, ids == spec.tokens.img_context)  # exactly the <IMG_CONTEXT> slots
        assert int((mod == VISION).sum()) == sum(r.tiles) * spec.num_image_token
        resp = torch.nonzero(mod == RESPONSE).flatten()
        assert len(resp) and int(resp[-1]) == r.length - 1  # the response runs to the end
        assert torch.equal(resp, torch.arange(int(resp[0]), r.length))  # ...as one contiguous block
        assert tok.decode(ids[resp[:3]].tolist()).startswith("<think>")
        assert tok.decode(ids[: int(resp[0])].tolist()).endswith("<\uff5cAssistant\uff5c>")  # r1v flavour
        assert int((mod == PROMPT).sum()) + int((mod == VISION).sum()) == int(resp[0])
        assert r.length <= SEQ


def test_truncation_warns_and_never_cuts_an_image(tiny_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "set"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    lines = [
        {
            "id": "long",
            "question": "Count.",
            "answer": "<think>\n" + "one two three " * 300 + "\n</think>\n\n3",
        },
        {"id": "img", "messages": [{"role": "user", "content": "x " * 200 + "<image>", "images": ["a.png"]}]},
    ]
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    spec = open_checkpoint(tiny_dir).spec
    cset = load_set(str(root), samples=2, seq_len=300)
    r = Renderer(tiny_dir, spec, 300)
    with pytest.warns(CalibrationWarning, match="truncated to 300"):
        long = r.render(cset.samples[0], cset)
    assert long.truncated and long.length == 300 and long.original_length > 300
    with pytest.warns(CalibrationWarning, match="1 image"):
        img = r.render(cset.samples[1], cset)
    assert img.image_keys == () and int((img.modality == VISION).sum()) == 0
    assert spec.tokens.img_start not in img.input_ids.tolist()  # cut before <img>, not inside the image


# -- statistics ---------------------------------------------------------------------------------------------
def test_outputs_and_report(runs: dict[str, Path], prepared) -> None:
    out = runs["ram"]
    assert sorted(p.name for p in out.iterdir()) == [
        "report.json", "sensitivity.json", "set_manifest.jsonl", "stats.safetensors"
    ]  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["sensitivity"]["file"] == SENSITIVITY_FILE and report["sensitivity"]["samples"] == SAMPLES
    stats = CalibrationStats.load(out)
    assert report["set"]["hash"] == stats.set_hash == prepared.set_hash
    t = report["tokens"]
    assert t["vision"] + t["prompt"] + t["response"] == t["total"] == sum(report["lengths"]["per_sample"])
    assert t["vision"] == 256 * report["tiles"]["total"] > 0 and t["response"] > t["prompt"]
    assert report["flavor"] == "r1v" and report["layers"] == stats.num_layers == 4
    for layer in range(4):
        for lin in ("q_proj", "self_attn.v_proj", "o_proj", "mlp.up_proj", "down_proj"):
            assert stats.count(layer, lin) == t["total"]
            for m in MODALITIES:
                assert stats.count(layer, lin, m) == t[m]
    k = stats.get(2, "k_proj", "sum_sq")
    assert torch.equal(k, stats.get(2, "qkv", "sum_sq")) and k.shape == (256,)
    assert torch.allclose(stats.importance(2, "k_proj"), k / t["total"])


def test_same_seed_same_stats_and_spill_is_identical(runs: dict[str, Path]) -> None:
    ram, spill = CalibrationStats.load(runs["ram"]), CalibrationStats.load(runs["spill"])
    assert ram.set_hash == spill.set_hash
    assert ram.tensors.keys() == spill.tensors.keys()
    for name, t in ram.tensors.items():
        assert torch.equal(t, spill.tensors[name]), name
    # the sensitivity pass spills exactly too
    assert (runs["ram"] / SENSITIVITY_FILE).read_bytes() == (runs["spill"] / SENSITIVITY_FILE).read_bytes()
    mem_ram = json.loads((runs["ram"] / "report.json").read_text())["memory"]
    mem_spill = json.loads((runs["spill"] / "report.json").read_text())["memory"]
    assert mem_ram["spilled_bytes"] == 0 and mem_spill["spilled_bytes"] > 0
    assert mem_spill["peak_cached_ram_bytes"] <= 1000


def test_stats_and_layer_inputs_match_the_full_forward(
    tiny_dir: Path, runs: dict[str, Path], prepared
) -> None:
    """Recompute everything with hooks on the whole R1VModel forward, independently of the layer loop."""
    model = R1VModel.from_checkpoint(tiny_dir)
    layers = model.language_model.model.layers
    ref = [LayerStats.for_layer(i, layer) for i, layer in enumerate(layers)]
    current: list[torch.Tensor] = [prepared.rendered[0].modality]
    entering: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: entering[i].append(a[0][0].clone()))
        for i, layer in enumerate(layers)
    ]
    hooks = [s.hooks(layer, current) for s, layer in zip(ref, layers, strict=True)]
    for h in hooks:
        h.__enter__()
    try:
        for r in prepared.rendered:
            current[0] = r.modality
            model(r.input_ids[None], prepared.renderer.pixels(r, prepared.cset))
    finally:
        for h in hooks:
            h.__exit__(None, None, None)
        for h in handles:
            h.remove()
    stats = CalibrationStats.load(runs["ram"])
    for s in ref:
        for name, want in s.tensors().items():
            got = stats.tensors[name]
            if ".count." in name:
                assert torch.equal(got, want), name
            else:
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (name, (got - want).abs().max())
    store = ActivationStore()
    p = prepared
    for cap in iter_layers(
        p.ckpt, p.renderer, p.cset, p.rendered, store, collect_stats=False, progress=False
    ):
        for j in range(len(p.rendered)):
            assert torch.allclose(cap.inputs[j], entering[cap.index][j], atol=1e-5), (cap.index, j)


# -- modality sensitivity (sensitivity.json, shared by `awq` and `gguf --modality-weights auto`) -----------
def test_sensitivity_file_schema_and_same_numbers_as_awq(runs: dict[str, Path], prepared) -> None:
    from r1v_quant.quant.awq_search import language_vision_sensitivity

    data = json.loads((runs["ram"] / SENSITIVITY_FILE).read_text())
    assert set(data) == {"format", "set_hash", "model", "modalities", "samples", "sample_ids",
                         "token_counts", "measured", "weights"}  # fmt: skip
    assert data["format"] == "r1v-quant-sensitivity/1" and data["modalities"] == list(MODALITIES)
    assert data["set_hash"] == prepared.set_hash == CalibrationStats.load(runs["ram"]).set_hash
    assert data["model"] == str(prepared.ckpt.path.resolve())
    assert data["samples"] == sensitivity_subset([r.modality for r in prepared.rendered]) == [0, 1, 2, 3]
    assert data["sample_ids"] == [r.id for r in prepared.rendered]
    counts = [sum(r.count(c) for r in prepared.rendered) for c in range(3)]
    assert data["token_counts"] == counts
    measured, weights = torch.tensor(data["measured"]), torch.tensor(data["weights"])
    assert weights.shape == measured.shape == (4, 3)
    assert torch.equal(weights, language_vision_sensitivity(measured, torch.tensor(counts).float()))
    assert (weights[:, 1] > 0).all() and torch.equal(weights[:, 1], weights[:, 2])  # language pooled
    # exactly what `awq --modality-weights auto` computes in its own run from the same prepared set
    assert torch.equal(modality_sensitivities(prepared, ActivationStore(), False), weights)
    sens = read_sensitivity(runs["ram"], num_layers=4, set_hash=prepared.set_hash)
    assert sens is not None and torch.equal(sens.weights, weights) and sens.samples == data["samples"]


def test_sensitivity_subset_spreads_over_both_kinds() -> None:
    from r1v_quant.quant.awq_search import screen_samples

    masks = [torch.tensor([VISION, PROMPT, RESPONSE] if j % 4 else [PROMPT, RESPONSE]) for j in range(24)]
    picked = sensitivity_subset(masks)
    assert len(picked) == SENSITIVITY_SAMPLES and picked == screen_samples(masks, SENSITIVITY_SAMPLES / 24)
    assert {bool((masks[j] == VISION).any()) for j in picked} == {True, False}
    assert sensitivity_subset(masks[:3]) == [0, 1, 2]  # fewer samples than that: all of them


def test_sensitivity_file_is_written_atomically(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sens = read_sensitivity(runs["ram"])
    assert sens is not None
    d = tmp_path / "c"
    write_sensitivity(sens, d)
    before = (d / SENSITIVITY_FILE).read_bytes()
    real = Path.write_text

    def half_then_full_disk(self: Path, text: str, *a, **k) -> int:
        real(self, text[: len(text) // 2], *a, **k)
        raise OSError(28, "No space left on device")

    changed = Sensitivity(sens.weights * 2, sens.measured, sens.token_counts, sens.samples,
                          sens.sample_ids, sens.set_hash)  # fmt: skip
    with monkeypatch.context() as mp:
        mp.setattr(Path, "write_text", half_then_full_disk)
        with pytest.raises(R1VError, match="no space left on device"):
            write_sensitivity(changed, d)
    assert sorted(p.name for p in d.iterdir()) == [SENSITIVITY_FILE]  # no temporary left behind
    assert (d / SENSITIVITY_FILE).read_bytes() == before  # the old file, whole
    write_sensitivity(changed, d)
    again = read_sensitivity(d)
    assert again is not None and torch.equal(again.weights, sens.weights * 2)
    # reading: absent -> None; broken or foreign -> one clear error
    assert read_sensitivity(tmp_path) is None
    (d / SENSITIVITY_FILE).write_text(json.dumps({"format": "something/9"}))
    with pytest.raises(R1VError, match="not a valid sensitivity file"):
        read_sensitivity(d)
    with pytest.raises(R1VError, match="5 decoder layers, the model has 4"):
        write_sensitivity(Sensitivity(torch.ones(5, 3), torch.ones(5, 3), torch.ones(3), [0], ["a"], "h"), d)
        read_sensitivity(d, num_layers=4)


def test_layer_capture_can_propagate_a_modified_layer(prepared) -> None:
    p = prepared
    caps = iter_layers(p.ckpt, p.renderer, p.cset, p.rendered[:1], ActivationStore(), progress=False)
    cap = next(caps)
    x0 = cap.inputs[0]
    assert not torch.equal(cap.outputs[0], x0)
    with torch.no_grad():  # a layer that adds nothing to the residual stream: output == input
        cap.layer.self_attn.o_proj.weight.zero_()
        cap.layer.mlp.down_proj.weight.zero_()
    cap.recompute_outputs()
    assert torch.equal(next(caps).inputs[0], x0)
    caps.close()


def test_store_spills_every_dtype_exactly(tmp_path: Path) -> None:
    store = ActivationStore(budget=0, spill_dir=tmp_path / "spill")
    for k, dt in enumerate((torch.float32, torch.bfloat16, torch.float16)):
        t = torch.randn(7, 5).to(dt)
        store.put("x", k, t)
        assert store.is_spilled("x", k) and torch.equal(store.get("x", k), t)
    store.close()
    assert not (tmp_path / "spill").exists()


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5g") == 1_500_000_000 and parse_size("100") == 100 and parse_size(None) is None
    with pytest.raises(R1VError, match="memory size"):
        parse_size("lots")


# -- bad input: clear errors, nothing written --------------------------------------------------------------
def _manifest(root: Path, lines: list[dict]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(root)


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing_image", "image file not found"),
        ("corrupt_image", "cannot read image"),
        ("empty_set", "is empty"),
        ("image_in_assistant", "user turns only"),
        ("bad_roles", "alternate|expected"),
        ("unknown_flavor", "unknown flavour"),
        ("unknown_template", "cannot tell the R1V flavour"),
        ("no_such_set", "no such file"),
        ("bad_memory", "memory size"),
    ],
)
def test_bad_input(tiny_dir: Path, tmp_path: Path, case: str, match: str) -> None:
    root = tmp_path / "set"
    set_spec, flavor, mem, model = str(root), None, None, tiny_dir
    if case == "missing_image":
        _manifest(root, [{"question": "<image>\nWhat?", "images": ["nope.png"], "answer": "x"}])
    elif case == "corrupt_image":
        _manifest(root, [{"question": "What?", "images": ["bad.png"], "answer": "x"}])
        (root / "bad.png").write_bytes(b"\x89PNG not really")
    elif case == "empty_set":
        _manifest(root, [])
    elif case == "image_in_assistant":
        (root / "a.png").parent.mkdir(parents=True)
        (root / "a.png").write_bytes(_png())
        msgs = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<image>", "images": ["a.png"]},
        ]
        _manifest(root, [{"messages": msgs}])
    elif case == "bad_roles":
        _manifest(root, [{"messages": [{"role": "assistant", "content": "first"}]}])
    elif case == "unknown_flavor":
        set_spec, flavor = "default", "r9000"
    elif case == "unknown_template":  # a config template and tokenizer this project does not know
        model = tmp_path / "model"
        shutil.copytree(tiny_dir, model)
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, "template": "mystery-chat"}))
        tcfg = json.loads((model / "tokenizer_config.json").read_text())
        tcfg.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(tcfg))
        (model / "chat_template.jinja").unlink(missing_ok=True)
        set_spec = "default"
    elif case == "no_such_set":
        set_spec = str(tmp_path / "missing")
    elif case == "bad_memory":
        set_spec, mem = "default", "lots"
    out = tmp_path / "out"
    with pytest.raises(R1VError, match=match):
        calibrate(model, set_spec, 1, 256, out, mem, flavor=flavor, progress=False)
    _nothing_written(out)


def test_refuses_non_empty_output(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(R1VError, match="not empty"):
        calibrate(tiny_dir, "default", 1, 256, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# -- command line ------------------------------------------------------------------------------------------
def test_cli_json_and_one_line_errors(tiny_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from r1v_quant.cli.calibrate import calibrate_command
    from r1v_quant.cli.main import Group

    group = Group(commands={"calibrate": calibrate_command})
    runner = CliRunner()
    out = tmp_path / "c"
    args = ["calibrate", str(tiny_dir), "--samples", "2", "--seq-len", "400", "--out", str(out)]
    r = runner.invoke(group, [*args, "--max-memory", "10KB", "--text-ratio", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert (
        report["set"]["samples"] == 2
        and report["set"]["text_only"] == 1
        and (out / "stats.safetensors").is_file()
        and (out / SENSITIVITY_FILE).is_file()
        and report["sensitivity"]["samples"] == 2
    )
    bare = tmp_path / "bare"
    r = runner.invoke(group, [*args[:-1], str(bare), "--no-sensitivity", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sensitivity"] is None and not (bare / SENSITIVITY_FILE).exists()
    bad = runner.invoke(group, [*args[:-1], str(tmp_path / "d"), "--flavor", "nope"])
    assert (
        bad.exit_code == 2
        and bad.stderr.strip().startswith("error:")
        and len(bad.stderr.strip().splitlines()) == 1
    )


# -- preflight plan (calibration/job_plan.py) and --max-memory auto ------------------------------------------
def _38b_text_samples(n: int = 64, tokens: int = 4096):
    from r1v_quant.calibration.job_plan import SampleShape

    return [SampleShape(tokens, 0, tokens // 2) for _ in range(n)]


def test_plan_38b_terms_by_hand() -> None:
    """One Qwen2-32B layer, the lm_head, the cached activations and the capture FLOPs at 38B, by hand."""
    from r1v_quant.calibration.job_plan import plan_flops, plan_terms, replay_store
    from r1v_quant.model.artifact import Geometry
    from r1v_quant.model.presets import preset_spec

    spec = preset_spec("r1v-38b")
    samples = _38b_text_samples()
    subset = list(range(8))
    terms = {t.name: t.bytes for t in plan_terms("awq", spec, samples, subset)}
    h, kv, f, vocab = 5120, 1024, 27648, 152064
    layer = h * h + 2 * h * kv + h * h + 3 * h * f + (h + 2 * kv) + 2 * h  # q k v o, mlp, biases, norms
    assert layer == 487_605_248
    assert terms["search.layer"] == terms["search.reference_copy"] == terms["capture.layer"] == 4 * layer
    assert terms["sensitivity.lm_head"] == vocab * h * (4 + 2)  # fp32 + its bf16 source
    assert terms["embed.table"] == vocab * h * 2
    x = 4096 * h * 4  # one sample's hidden states, fp32
    st = replay_store("calibrate", Geometry.from_spec(spec), samples, subset, None)
    assert st.phase_peak["capture"] == 2 * 64 * x  # inputs + outputs of every sample
    # sensitivity, 64 layers, checkpoints every 8: the top segment's 8 recomputed inputs, the 7
    # checkpoints below it and the gradients, for 8 samples
    assert st.phase_peak["sensitivity"] == (7 + 8 + 1) * 8 * x
    assert st.phase_peak["sensitivity_head"] == (8 + 2) * 8 * x  # checkpoints + top outputs + gradients
    flops = plan_flops("calibrate", spec, samples, None)
    lin = layer - (h + 2 * kv) - 2 * h
    assert flops["capture"] == pytest.approx(64 * 64 * (2 * lin * 4096 + 2 * 40 * 128 * 4096**2))


def test_auto_budget_from_faked_memavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import r1v_quant.calibration.job_plan as jp
    from r1v_quant.calibration.store import parse_max_memory
    from r1v_quant.model.presets import preset_spec

    assert parse_max_memory("auto") == "auto" and parse_max_memory(" AUTO ") == "auto"
    assert parse_max_memory("none") is None and parse_max_memory(None) is None
    assert parse_max_memory("0") == 0 and parse_max_memory("2GB") == 2 * 10**9
    spec, samples = preset_spec("r1v-38b"), _38b_text_samples()
    rate = {"cpu": 100.0}
    monkeypatch.setattr(jp, "mem_available", lambda: 12 * 10**9)
    p = jp.make_plan(
        "calibrate", spec, samples, list(range(8)), budget="auto", spill_dir=tmp_path, gflops=rate
    )
    margin = int(0.10 * 12e9)
    assert p.available_bytes == 12 * 10**9 and p.margin_bytes == margin
    assert p.budget == 12 * 10**9 - margin - p.working_peak
    assert p.activation_bytes == 2 * 64 * 4096 * 5120 * 4 > p.budget > 0
    assert p.spill_bytes > 0 and p.peak_bytes <= 12 * 10**9 - margin
    assert p.seconds == pytest.approx(sum(f / (100e9 * jp.PHASE_EFFICIENCY[k]) for k, f in p.flops.items()))
    # plenty of memory: nothing spills; a plain size and none behave as written
    monkeypatch.setattr(jp, "mem_available", lambda: 10**12)
    big = jp.make_plan("calibrate", spec, samples, None, budget="auto", spill_dir=tmp_path, gflops=rate)
    assert big.spill_bytes == 0 and big.budget > big.activation_bytes
    fixed = jp.make_plan("calibrate", spec, samples, None, budget=10**9, spill_dir=tmp_path, gflops=rate)
    assert fixed.budget == 10**9 and fixed.budget_source == "size" and fixed.spill_bytes > 0
    none = jp.make_plan("calibrate", spec, samples, None, budget=None, spill_dir=tmp_path, gflops=rate)
    assert none.budget is None and none.spill_bytes == 0 and none.peak_bytes > fixed.peak_bytes
    # too little memory for the working set alone: refused with what to change
    monkeypatch.setattr(jp, "mem_available", lambda: 2 * 10**9)
    small = jp.make_plan("awq", spec, samples, None, budget="auto", spill_dir=tmp_path, gflops=rate)
    assert small.budget == 0
    with pytest.raises(R1VError, match=r"RAM besides cached activations.*--samples.*--device cuda"):
        jp.check_plan(small)


def test_plan_predicts_the_store_exactly(runs: dict[str, Path]) -> None:
    """The replayed store equals the real one: peak RAM unbudgeted, peak spill under a 1 KB budget."""
    ram = json.loads((runs["ram"] / "report.json").read_text())
    spill = json.loads((runs["spill"] / "report.json").read_text())
    assert ram["plan"]["activation_bytes"] == ram["memory"]["peak_cached_ram_bytes"] > 0
    assert ram["plan"]["budget_source"] == "none" and ram["plan"]["predicted_spill_bytes"] == 0
    assert spill["plan"]["budget_bytes"] == 1000 == spill["memory"]["max_memory_bytes"]
    assert spill["plan"]["predicted_spill_bytes"] == spill["memory"]["peak_spill_disk_bytes"] > 0
    for r in (ram, spill):
        assert r["plan"]["predicted_peak_bytes"] > 0 and r["plan"]["estimated_seconds"] > 0
        assert r["plan"]["flops"]["capture"] > 0 and r["plan"]["flops"]["sensitivity"] > 0


def test_disk_full_refusal_leaves_nothing(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "out"
    with pytest.raises(R1VError, match="not enough disk at .*spill .* of activations"):
        calibrate(tiny_dir, "default", 2, 256, out, "0", progress=False)
    _nothing_written(out)


def test_cli_json_has_the_plan(tiny_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from r1v_quant.cli.calibrate import calibrate_command
    from r1v_quant.cli.main import Group

    out = tmp_path / "c"
    args = ["calibrate", str(tiny_dir), "--samples", "2", "--seq-len", "256", "--out", str(out)]
    r = CliRunner().invoke(
        Group(commands={"calibrate": calibrate_command}), [*args, "--no-sensitivity", "--json"]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    plan = report["plan"]
    assert plan["job"] == "calibrate" and plan["budget_source"] == "auto"  # the default
    assert plan["activation_bytes"] == report["memory"]["peak_cached_ram_bytes"]
    names = {t["name"] for t in plan["terms"]}
    assert {"runtime.base", "capture.layer", "cache.capture", "embed.table"} <= names
    assert "sensitivity.lm_head" not in names and "sensitivity" not in plan["flops"]
    assert json.loads((out / "report.json").read_text())["plan"]["job"] == "calibrate"


# -- --device (r1v_quant/util/device.py): every pass device-aware, CPU results unchanged
def _capture_all(p, rendered, **kw) -> tuple[list[dict[str, torch.Tensor]], list[list[torch.Tensor]]]:
    stats, outs = [], []
    for cap in iter_layers(p.ckpt, p.renderer, p.cset, rendered, ActivationStore(), progress=False, **kw):
        assert cap.stats is not None and all(t.device.type == "cpu" for t in cap.stats.tensors().values())
        stats.append(cap.stats.tensors())
        outs.append([cap.outputs[j].clone() for j in range(len(rendered))])
    return stats, outs


def test_explicit_cpu_device_is_identical_to_the_default(prepared, runs: dict[str, Path]) -> None:
    """capture (vision tower included), statistics and sensitivity with device="cpu" passed explicitly
    (as a string or a torch.device) equal the default to the bit, on the CPU."""
    from r1v_quant.calibration.capture import image_features, layer_sensitivity
    from r1v_quant.calibration.sensitivity import measure_sensitivity

    p = prepared
    sub = [next(r for r in p.rendered if r.image_keys), next(r for r in p.rendered if not r.image_keys)]
    want = image_features(p.ckpt, p.renderer, p.cset, sub, ActivationStore(), progress=False)
    got = image_features(p.ckpt, p.renderer, p.cset, sub, ActivationStore(), progress=False, device="cpu")
    assert got[0].device.type == "cpu" and torch.equal(got[0], want[0])  # the vision tower ran
    ref_stats, ref_outs = _capture_all(p, sub)
    stats, outs = _capture_all(p, sub, device="cpu")
    for a, b in zip(stats, ref_stats, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(outs, ref_outs, strict=True):
        assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))
    s0, n0 = layer_sensitivity(p.ckpt, p.renderer, p.cset, sub, ActivationStore(), progress=False)
    s1, n1 = layer_sensitivity(
        p.ckpt, p.renderer, p.cset, sub, ActivationStore(), progress=False, device=torch.device("cpu")
    )
    assert s0.dtype == s1.dtype == torch.float32 and torch.equal(s0, s1) and torch.equal(n0, n1)
    # the default-device run of `calibrate` (auto: cpu here) stored the same weights
    m = measure_sensitivity(p, ActivationStore(), progress=False, device="cpu")
    stored = read_sensitivity(runs["ram"])
    if not torch.cuda.is_available():
        assert stored is not None and torch.equal(m.weights, stored.weights)


def test_calibrate_device_cpu_matches_auto_and_is_reported(
    runs: dict[str, Path], tiny_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cpu"
    report = calibrate(tiny_dir, "default", SAMPLES, SEQ, out, None, seed=0, progress=False, device="cpu")
    ram = json.loads((runs["ram"] / "report.json").read_text())
    assert report["device"] == "cpu" and report["plan"]["device"] == "cpu"
    assert ram["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # auto
    if ram["device"] == "cpu":  # same numbers (safetensors' header order varies between writes)
        a, b = CalibrationStats.load(out), CalibrationStats.load(runs["ram"])
        assert a.metadata == b.metadata and a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        assert (out / SENSITIVITY_FILE).read_bytes() == (runs["ram"] / SENSITIVITY_FILE).read_bytes()


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from r1v_quant.util.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(R1VError, match="--device cuda: no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(R1VError, match="unknown --device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_calibrate_cli_device_cuda_without_cuda_is_one_line(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from r1v_quant.cli.calibrate import calibrate_command
    from r1v_quant.cli.main import Group

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "c"
    args = ["calibrate", str(tiny_dir), "--samples", "2", "--seq-len", "256", "--out", str(out)]
    r = CliRunner().invoke(Group(commands={"calibrate": calibrate_command}), [*args, "--device", "cuda"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--device cuda: no CUDA device" in lines[0]
    assert not out.exists()


def test_plan_on_cuda_moves_every_pass_to_the_gpu(tmp_path: Path) -> None:
    """--device cuda: layer and sample working sets in the gpu pool (one layer + one sample), the host
    keeps the store and the 16-bit sources; every pass timed at the GPU rate. The CPU plan is unchanged."""
    import r1v_quant.calibration.job_plan as jp
    from r1v_quant.model.presets import preset_spec

    spec = preset_spec("r1v-38b")
    samples = [jp.SampleShape(4096, 7 if j < 48 else 0, 2048) for j in range(64)]
    sub = list(range(4, 64, 8))
    rate = {"cpu": 1000.0, "gpu": 50_000.0}
    kw = dict(budget=None, spill_dir=tmp_path, available=22 * 10**9, gflops=rate)
    for job in ("calibrate", "awq"):
        cpu = jp.make_plan(job, spec, samples, sub, device="cpu", **kw)
        gpu = jp.make_plan(job, spec, samples, sub, device="cuda", **kw)
        t_cpu, t_gpu = {t.name: t for t in cpu.terms}, {t.name: t for t in gpu.terms}
        for name in ("vision.layer", "capture.layer", "capture.transient", "sensitivity.layer",
                     "sensitivity.backward", "sensitivity.lm_head", "sensitivity.logits"):  # fmt: skip
            assert t_cpu[name].pool == "cpu" and t_gpu[name].pool == "gpu", name
        assert t_gpu["capture.layer"].bytes == t_cpu["capture.layer"].bytes  # the same layer, elsewhere
        assert t_gpu["sensitivity.lm_head"].bytes == 152064 * 5120 * 4  # no 16-bit source on the GPU
        assert t_gpu["sensitivity.lm_head_source"].bytes == 152064 * 5120 * 2  # ... it is on the host
        assert {"vision.host", "capture.host", "sensitivity.host"} <= t_gpu.keys()
        assert not {"vision.host", "capture.host", "sensitivity.host"} & t_cpu.keys()
        assert t_gpu["embed.table"].pool == "cpu"  # the embedding lookup stays host-side
        # the store is host-side on both; the host peak drops, the GPU holds one layer + one sample
        assert gpu.activation_bytes == cpu.activation_bytes and gpu.peak_bytes < cpu.peak_bytes
        assert gpu.seconds == pytest.approx(sum(gpu.flops.values()) / 50_000e9)
        assert gpu.to_json()["device"] == "cuda" and "GPU peak" in gpu.summary()
        assert cpu.gpu_peak_bytes is None and cpu.to_json()["device"] == "cpu"
    # calibrate on cuda: GPU peak = one layer (or the lm_head) plus one sample's working set, a few GB
    cal = jp.make_plan("calibrate", spec, samples, sub, device="cuda", **kw)
    assert cal.gpu_peak_bytes is not None and 4 * 487_605_248 < cal.gpu_peak_bytes < 8 * 10**9
    assert cal.seconds < 3600  # minutes at 50 TFLOP/s, not the CPU's hours
    # too little RAM on cuda: refused without suggesting --device cuda again
    tight = jp.make_plan("calibrate", spec, samples, sub, device="cuda", **{**kw, "available": 10**9})
    with pytest.raises(R1VError, match=r"RAM besides cached activations") as e:
        jp.check_plan(tight)
    assert "--device cuda" not in str(e.value)

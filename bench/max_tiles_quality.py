"""What `--max-tiles` costs in answer quality: the trained replica answering questions about pictures larger
than one tile, with the dynamic tiling capped at 1, 2, 4, 6 and 12 (the default) tiles.

    .venv/bin/python bench/max_tiles_quality.py REPLICA [--n 64] [--caps 1 2 4 6 12] [--threads 2]

The questions are the replica's own image tasks (colour, shape, which of two shapes is larger, ...) on fresh
scenes (seed 90,101, not a training seed), each picture rendered at one of three sizes in turn: 1344 x 896
(3 x 2 grid + thumbnail = 7 tiles at the default cap), 896 x 896 (2 x 2 + thumbnail = 5) and 1792 x 448
(4 x 1 + thumbnail = 5). Per cap: greedy answers through `eval bench`'s torch backend with
`RuntimeOptions(max_tiles=cap)` graded by `eval bench`'s grader (accuracy, and paired against the default
cap), the teacher-forced mean log-loss of the worked answer, the mean tiles per image and the vision
tower's time per image. The replica was trained on 448 x 448 pictures only (one tile), so more tiles are
not more information it has learned to use: the result says what capping does to *this* model.
Writes bench/results/max_tiles_quality.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(1344, 896), (896, 896), (1792, 448)]
SEED = 90_101


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("replica", type=Path)
    ap.add_argument("--n", type=int, default=64, help="questions (one picture each)")
    ap.add_argument("--caps", type=int, nargs="+", default=[1, 2, 4, 6, 12])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.results_io import write_result
    from r1v_quant.data.synthdata import image_problems
    from r1v_quant.evaluate.backend_protocol import GenRequest
    from r1v_quant.evaluate.backends import TorchBackend, greedy
    from r1v_quant.evaluate.bench import grade
    from r1v_quant.evaluate.bench_sets import BenchItem
    from r1v_quant.model.artifact import resolve_artifact
    from r1v_quant.model.reference import build_inputs
    from r1v_quant.runtime.options import RuntimeOptions

    torch.set_num_threads(a.threads)
    problems = image_problems(a.n, SEED)
    pictures = [p.scene.render(SIZES[i % len(SIZES)]) for i, p in enumerate(problems)]
    items = [
        BenchItem(f"image-{i}", f"<image>\n{p.question}", p.answer, p.grading, p.task, images=[pic])
        for i, (p, pic) in enumerate(zip(problems, pictures, strict=True))
    ]
    art = resolve_artifact(a.replica)
    rows: dict[int, dict[str, Any]] = {}
    correct: dict[int, list[bool]] = {}
    for cap in a.caps:
        be = TorchBackend(art, RuntimeOptions(torch_device="cpu", torch_dtype="float32", max_tiles=cap))
        tiles, vision_s, nll = [], [], []
        with torch.inference_mode():  # warm-up: the first forward's one-time costs are not vision time
            _, warm, _ = build_inputs(art.path, be.spec, "<image>\nq", [pictures[0]], max_tiles=cap)
            be.lm.model.image_embeds(warm)
        for p, pic in zip(problems, pictures, strict=True):
            ids, pixels, _ = build_inputs(art.path, be.spec, f"<image>\n{p.question}", [pic], max_tiles=cap)
            tiles.append(int(pixels.shape[0]))
            with torch.inference_mode():
                t0 = time.perf_counter()
                be.lm.model.image_embeds(pixels)
                vision_s.append(time.perf_counter() - t0)
                resp = torch.tensor([be.lm.tok.encode(p.response())])
                full = torch.cat([ids, resp], 1)
                logits = be.lm.model(full, pixels)[0, ids.shape[1] - 1 : -1].float()
                nll.append(float(torch.nn.functional.cross_entropy(logits, resp[0])))
        reqs = [GenRequest(it.question, it.images, 0) for it in items]
        gens = be.generate_many(reqs, greedy(96))
        correct[cap] = [
            grade(it, g.text, g.stopped, g.n_tokens).correct for it, g in zip(items, gens, strict=True)
        ]
        be.close()
        rows[cap] = {
            "max_tiles": cap,
            "tiles_mean": statistics.mean(tiles),
            "tiles_max": max(tiles),
            "accuracy": sum(correct[cap]) / len(items),
            "answer_nll_mean": statistics.mean(nll),
            "vision_ms_per_image": 1000 * statistics.median(vision_s),
        }
        r = rows[cap]
        print(
            f"cap {cap:>2}: {r['tiles_mean']:.1f} tiles, accuracy {r['accuracy']:.3f}, "
            f"answer NLL {r['answer_nll_mean']:.4f}, vision {r['vision_ms_per_image']:.0f} ms",
            flush=True,
        )
    base = max(a.caps)
    for cap in a.caps:  # paired against the default cap: items it gets right that the cap loses, and back
        rows[cap]["lost_vs_default"] = sum(
            b and not c for b, c in zip(correct[base], correct[cap], strict=True)
        )
        rows[cap]["gained_vs_default"] = sum(
            c and not b for b, c in zip(correct[base], correct[cap], strict=True)
        )
    by_task: dict[str, dict[int, float]] = {}
    for task in sorted({p.task for p in problems}):
        idx = [i for i, p in enumerate(problems) if p.task == task]
        by_task[task] = {cap: sum(correct[cap][i] for i in idx) / len(idx) for cap in a.caps}
    path = write_result(
        "max_tiles_quality",
        {"replica": str(a.replica), "n": a.n, "sizes": SIZES, "seed": SEED, "threads": a.threads,
         "rows": list(rows.values()), "accuracy_by_task": by_task},
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

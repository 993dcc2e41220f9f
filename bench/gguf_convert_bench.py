"""`r1v-quant gguf` vs llama.cpp's own tools on the same checkpoint, side by side in one run.

Part 1, conversion: llama.cpp's `convert_hf_to_gguf.py` (from the llama.cpp tree that llama-cpp-python
vendors, so both sides use the same llama.cpp) against `r1v-quant gguf --mmproj-type none`, for 16-bit and
Q8_0 outputs, and for Q4_K_M (theirs: convert to BF16, then llama_model_quantize, as `llama-quantize`
does). Each side runs as its own process: wall time and peak RSS (from wait4), then tensor-by-tensor
equality of the outputs and llama.cpp logits on the same prompt.

llama.cpp's converter does not know the replica's tokenizer hash (it recognises pre-tokenizers by hashing
the tokens of a test string), so a copy of it in a temp dir is patched to name the pre-tokenizer that
r1v-quant writes for this flavour; nothing of llama.cpp is kept. It needs `sentencepiece` importable
(`--pythonpath DIR` adds e.g. a `pip install --target DIR sentencepiece` folder for its process only).

Part 2, importance matrix: our imatrix GGUF is read by llama.cpp's own loader (common/imatrix-loader.cpp,
compiled here with the same normalisation as tools/quantize: in_sum2 / counts) and the folded F16 is
quantized through it; the tensors must equal the ones our direct `llama_model_quantize_params.imatrix`
path produces. Needs a C++ compiler; llama-cpp-python's wheel has no `llama-quantize` binary.

    python bench/gguf_convert_bench.py --llama-cpp SRC [--model DIR] [--pythonpath DIR]

SRC: a llama.cpp tree, or the llama-cpp-python sdist (`pip download llama-cpp-python==0.3.36 --no-deps
--no-binary :all:`, a .tar.gz; its vendor/llama.cpp is used).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

PRE_MARKER = "        if res is None:\n            logger.warning"
NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "common/", "include/", "ggml/include/")

HARNESS = r"""
// llama-quantize's imatrix path with llama.cpp's own loader (common/imatrix-loader.cpp), as a program.
#include "imatrix-loader.h"
#include "llama.h"
#include "log.h"
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <vector>
// libcommon's logger is not in llama-cpp-python's libraries: print the loader's messages directly
int common_log_get_verbosity_thold(void) { return 1000; }
struct common_log * common_log_main() { return nullptr; }
void common_log_add(struct common_log *, enum ggml_log_level, const char * fmt, ...) {
    va_list a; va_start(a, fmt); vfprintf(stderr, fmt, a); va_end(a);
}
int main(int argc, char ** argv) {
    if (argc != 6) { fprintf(stderr, "usage: imatrix.gguf in.gguf out.gguf ftype pure\n"); return 64; }
    common_imatrix loaded;
    if (!common_imatrix_load(argv[1], loaded)) return 3;
    if (!loaded.is_legacy && !loaded.has_metadata) { fprintf(stderr, "no imatrix metadata\n"); return 4; }
    std::unordered_map<std::string, std::vector<float>> data;
    for (const auto & [name, entry] : loaded.entries) {  // tools/quantize/quantize.cpp load_imatrix (GGUF)
        auto & e = data[name];
        e.resize(entry.sums.size());
        const int64_t ncounts = entry.counts.size();
        const int64_t ne0 = (int64_t) entry.sums.size() / ncounts;
        for (int64_t j = 0; j < ncounts; ++j) {
            const float count = (float) entry.counts[j];
            for (int64_t i = 0; i < ne0; ++i) e[j*ne0 + i] = count > 0.0f ? entry.sums[j*ne0 + i] / count : 1;
        }
    }
    std::vector<llama_model_imatrix_data> i_data;
    for (const auto & kv : data) i_data.push_back({kv.first.c_str(), kv.second.data(), kv.second.size()});
    i_data.push_back({nullptr, nullptr, 0});
    llama_model_quantize_params params = llama_model_quantize_default_params();
    params.ftype = (llama_ftype) atoi(argv[4]);
    params.pure = atoi(argv[5]) != 0;
    params.imatrix = i_data.data();
    printf("loaded %zu entries, %d chunks of %d, %zu dataset(s)\n", data.size(), loaded.chunk_count,
           loaded.chunk_size, loaded.datasets.size());
    return llama_model_quantize(argv[2], argv[3], &params);
}
"""


def llama_tree(src: Path, tmp: Path) -> Path:
    """The llama.cpp tree: `src` itself, or the needed parts of vendor/llama.cpp extracted from the sdist."""
    if src.is_dir():
        return src / "vendor" / "llama.cpp" if (src / "vendor" / "llama.cpp").is_dir() else src
    out = tmp / "llama-src"
    with tarfile.open(src) as tar:
        members = []
        for m in tar.getmembers():
            _, _, rest = m.name.partition("/vendor/llama.cpp/")
            if rest and rest.startswith(NEEDED) and (m.isfile() or m.isdir()):
                m.name = rest
                members.append(m)
        tar.extractall(out, members=members, filter="data")
    return out


def patched_converter(tree: Path, tmp: Path, pre: str) -> Path:
    """A copy of the converter whose unknown-hash branch names `pre` instead of failing."""
    work = tmp / "converter"
    work.mkdir()
    shutil.copy(tree / "convert_hf_to_gguf.py", work / "convert_hf_to_gguf.py")
    shutil.copytree(tree / "conversion", work / "conversion")
    shutil.copytree(tree / "gguf-py", work / "gguf-py")
    base = work / "conversion" / "base.py"
    text = base.read_text()
    if text.count(PRE_MARKER) != 1:
        raise SystemExit("cannot find the pre-tokenizer check in conversion/base.py to patch")
    patch = f"        if res is None:  # r1v-quant bench\n            res = {pre!r}\n"
    base.write_text(text.replace(PRE_MARKER, patch + PRE_MARKER))
    return work / "convert_hf_to_gguf.py"


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one process (and its waited-for children)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read() if p.stderr else b""
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{err.decode(errors='replace')[-3000:]}")
    return secs, usage.ru_maxrss * 1024


def compare(ours: Path, theirs: Path) -> tuple[str, list[str]]:
    import gguf

    a = {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: (t.tensor_type, t.data.tobytes()) for t in gguf.GGUFReader(theirs).tensors}
    same = sum(1 for k in a if k in b and a[k] == b[k])
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return f"{same}/{len(a | b)} tensors identical", diff


def metadata_diff(ours: Path, theirs: Path) -> list[str]:
    """Keys present in one file only, or with other values (GGUF.* header fields left out)."""
    import gguf

    def kv(path: Path) -> dict[str, object]:
        r = gguf.GGUFReader(path)
        return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}

    a, b = kv(ours), kv(theirs)
    return sorted(
        (f"+{k}" if k not in b else f"-{k}" if k not in a else f"~{k}")
        for k in a.keys() | b.keys()
        if a.get(k) != b.get(k)
    )


def logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def imatrix_check(tree: Path, model_dir: Path, tmp: Path, calib: Path) -> list[str]:
    """Our imatrix file through llama.cpp's loader == our direct imatrix path, tensor for tensor."""
    import llama_cpp

    from r1v_quant.exporters.gguf_imatrix import read_imatrix_gguf
    from r1v_quant.exporters.gguf_llm import export_llm_gguf
    from r1v_quant.exporters.quantize import llama_quantize

    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        return ["skipped: no C++ compiler"]
    lib = Path(llama_cpp.__file__).parent / "lib"
    (tmp / "harness.cpp").write_text(HARNESS)
    exe = tmp / "quant_imatrix"
    subprocess.run(
        [cxx, "-std=c++17", "-O1", f"-I{tree}/include", f"-I{tree}/ggml/include", f"-I{tree}/common",
         str(tmp / "harness.cpp"), str(tree / "common" / "imatrix-loader.cpp"), f"-L{lib}", "-lllama",
         "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}", "-o", str(exe)],
        check=True,
    )  # fmt: skip
    folded = tmp / "imx" / "folded-F16.gguf"
    export_llm_gguf(model_dir, folded, "F16", progress=False, calib=calib, activation_aware=True)
    imatrix = folded.with_name("folded-F16.imatrix.gguf")
    lines = []
    for name, pure in (("Q4_K_M", 0), ("IQ4_XS", 0), ("Q4_0", 1)):
        theirs, ours = tmp / "imx" / f"loader-{name}.gguf", tmp / "imx" / f"direct-{name}.gguf"
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        r = subprocess.run([str(exe), str(imatrix), str(folded), str(theirs), str(ftype), str(pure)],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            lines.append(f"{name}: llama.cpp's loader path failed ({r.returncode}): {r.stderr[-500:]}")
            continue
        llama_quantize(folded, ours, name, imatrix=read_imatrix_gguf(imatrix).means())
        summary, diff = compare(ours, theirs)
        lines.append(f"{name}: {r.stdout.strip()}; {summary}" + (f" (differ: {diff[:5]})" if diff else ""))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp tree or llama-cpp-python sdist")
    ap.add_argument("--model", type=Path, default=None, help="16-bit checkpoint (default: the tiny replica)")
    ap.add_argument("--pythonpath", default="", help="extra PYTHONPATH for the converter (sentencepiece)")
    ap.add_argument("--types", default="F16,BF16,Q8_0,Q4_K_M")
    args = ap.parse_args()
    from r1v_quant.exporters.gguf_vocab import load_vocab
    from r1v_quant.exporters.quantize import llama_quantize
    from r1v_quant.model.checkpoint import open_checkpoint
    from r1v_quant.model.prompts import build_prompt
    from r1v_quant.model.tokenizer import R1VTokenizer

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = args.model
        if model_dir is None:
            from r1v_quant.replica.build import TinyOptions, build_tiny

            model_dir = tmp / "tiny"
            build_tiny(model_dir, TinyOptions())
        tree = llama_tree(args.llama_cpp, tmp)
        spec = open_checkpoint(model_dir).spec
        pre = load_vocab(model_dir, flavor=spec.flavor, vocab_size=spec.llm.vocab_size).pre
        converter = patched_converter(tree, tmp, pre)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.pythonpath, env.get("PYTHONPATH", "")) if p)
        probe = subprocess.run([sys.executable, "-c", "import sentencepiece"], env=env, capture_output=True)
        if probe.returncode != 0:
            raise SystemExit(
                "llama.cpp's converter imports sentencepiece (Qwen2Model.set_vocab), which is not installed: "
                "pip install sentencepiece, or pass --pythonpath to a folder that has it"
            )
        tok = R1VTokenizer.from_dir(model_dir)
        ids = tok.encode(build_prompt(spec.flavor, [{"role": "user", "content": "What is 12 + 30?"}]) + "42.")
        rows = []
        meta: dict[str, list[str]] = {}
        for t in [x.strip().upper() for x in args.types.split(",") if x.strip()]:
            ours_dir, theirs = tmp / f"ours-{t}", tmp / f"theirs-{t}.gguf"
            cmd = [sys.executable, "-m", "r1v_quant.cli.main", "gguf", str(model_dir), "--out", str(ours_dir),
                   "--type", t, "--mmproj-type", "none"]  # fmt: skip
            ours_s, ours_rss = run(cmd)
            ours = next(ours_dir.glob("*.gguf"))
            outtype = {"F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}.get(t, "bf16")
            conv = tmp / f"conv-{t}.gguf" if t not in ("F16", "BF16", "Q8_0") else theirs
            cmd = [sys.executable, str(converter), str(model_dir), "--outtype", outtype,
                   "--outfile", str(conv)]  # fmt: skip
            their_s, their_rss = run(cmd, env)
            if conv != theirs:  # K-quant: llama-quantize's step, through the same libllama call
                t0 = time.perf_counter()
                llama_quantize(conv, theirs, t)
                their_s += time.perf_counter() - t0
            summary, diff = compare(ours, theirs)
            a, b = logits(ours, ids), logits(theirs, ids)
            rows.append((t, ours_s, their_s, ours_rss, their_rss, summary, diff, float(np.abs(a - b).max())))
            meta[t] = metadata_diff(ours, theirs)
        imx = []
        calib = tmp / "calib"
        from r1v_quant.calibration.pipeline import calibrate

        calibrate(model_dir, "default", 8, 512, calib, progress=False)
        imx = imatrix_check(tree, model_dir, tmp, calib)
    print(
        f"\n{'type':<8}{'ours s':>8}{'theirs s':>9}{'ratio':>7}{'ours MiB':>10}{'theirs MiB':>11}"
        f"{'ratio':>7}{'max |Δlogit|':>13}  tensors"
    )
    for t, os_, ts, orss, trss, summary, diff, dl in rows:
        print(
            f"{t:<8}{os_:>8.2f}{ts:>9.2f}{os_ / ts:>7.2f}{orss / 2**20:>10.0f}{trss / 2**20:>11.0f}"
            f"{orss / trss:>7.2f}{dl:>13.3g}  {summary}"
            + (f"; differ: {', '.join(diff[:6])}" if diff else "")
        )
    print("\nmetadata keys (+ ours only, - theirs only, ~ other value):")
    for t, keys in meta.items():
        print(f"  {t}: {', '.join(keys) or 'identical'}")
    print("\nimatrix file through llama.cpp's own loader vs our direct imatrix (folded F16 input):")
    for line in imx:
        print("  " + line)


if __name__ == "__main__":
    main()

"""kvcompress beside kvpress on a compressed prompt: one protocol, one table.

The protocol is `kvcompress.measure.prompt`'s (the same as `kvcompress eval --context N --tokens M`):
N context tokens prefilled at once into the compressed cache, the next M teacher-forced in chunks
of 32 at their true positions, KL(uncompressed || compressed) and the PPL change over the M
continuation tokens. kvpress runs in its own environment (`benchmarks/kvpress/setup.sh`; it pins
transformers < 5.3, so it is never a kvcompress dependency) on token ids this script exports, and
this script only reads the JSON lines it writes:

    # 1. the ids (report part of the embedded corpus, as kvcompress eval reads it; --text code|plays for
    #    another kind of text, recorded in the ids file and the results) and the model's folder
    OMP_NUM_THREADS=1 python benchmarks/side_by_side.py --export-ids runs/side/ids.json
    # 2. the kvpress rows, in kvpress's environment
    bash benchmarks/kvpress/setup.sh
    OMP_NUM_THREADS=1 .venv-kvpress/bin/python benchmarks/kvpress/run_kvpress.py \\
        --ids runs/side/ids.json --out runs/side/kvpress.jsonl --threads 1
    # 3. the kvcompress rows, and the table of both
    OMP_NUM_THREADS=1 python benchmarks/side_by_side.py --ids runs/side/ids.json --specs int4,int3,k4v2,int2 \\
        --kvpress runs/side/kvpress.jsonl --out runs/side

Columns: context compression (kvpress's count: context tokens / tokens kept; for kvcompress rows
kept fraction x the codec's ratio, the full-precision window and sinks not counted, see
`measure.prompt`), the whole-cache ratio where the row knows it (kvcompress rows: fp16 bytes of the
context / every byte stored, window included), KL with its 95% interval (moving-block bootstrap,
computed here from each row's per-position series, the same way for both libraries), PPL change
and top-1 agreement.

This script does not install or import kvpress, and does not choose settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_SPECS = "int4,int3,k4v2,int2"


class UsageError(ValueError):
    """A wrong option or input file; printed as one line, exit status 2."""


def export_ids(path: str, *, context: int, tokens: int, offset: int, model_name: str | None, dtype: str,
               kind: str | None = None, corpus: str | None = None, part: str = "report") -> dict:
    """Write the ids of the protocol's text, the protocol, the model's local folder and the
    uncompressed perplexity kvcompress measures (a check for the other environment)."""
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    from kvcompress.corpus import corpus_slice
    from kvcompress.io import content_hash, write_json_atomic
    from kvcompress.measure.prompt import continuation_bounds, forward_chunk, prefill, protocol_record
    from kvcompress.models import DTYPES, load_model, model_id

    model, tok = load_model(model_name, dtype=DTYPES[dtype])
    text = corpus_slice(tok, part, n_tokens=context + tokens + 1, offset=offset, kind=kind, path=corpus)
    ids = text.ids
    cache, nll = DynamicCache(config=model.config), []
    with torch.no_grad():
        prefill(model, cache, ids, context)
        for start, stop in continuation_bounds(context, tokens):
            logits = forward_chunk(model, cache, ids, start, stop, "uncompressed")
            nll.append(F.cross_entropy(logits, ids[0, start + 1:stop + 1], reduction="none"))
    folder = model.kvcompress_load_info.get("cache_dir") or (model_name if model_name and Path(model_name).is_dir()
                                                             else None)
    data = {"protocol": protocol_record(context, tokens), "text": text.record, "ids": ids[0].tolist(),
            "ids_sha256": content_hash(ids[0].tolist()), "dtype": dtype,
            "model": {"name": model_id(model), "folder": folder, "argument": model_name},
            "baseline": {"ppl": torch.cat(nll).double().mean().exp().item(), "library": "kvcompress"}}
    write_json_atomic(path, data)
    return data


def family(spec_name: str) -> str:
    """'quantization', 'eviction' or 'eviction + quantization': what a kvcompress spec does to a prompt."""
    from kvcompress import load_spec
    from kvcompress.measure.evaluate import is_lossy

    spec = load_spec(spec_name)
    if spec.eviction is None:
        return "kvcompress quantization"
    return "kvcompress eviction + quantization" if is_lossy(spec) else "kvcompress eviction"


def kvcompress_rows(ids_file: dict, specs: list[str], dtype: str, done_path: Path | None = None) -> list[dict]:
    """One row per spec, measured with `measure.prompt.prompt_eval` on the exported ids.

    With `done_path` (a JSON-lines file), each row is appended there as soon as it is measured and
    rows already there (same spec name and content, ids, dtype and calibration artifact) are reused:
    an interrupted run resumes, and a preset whose spec or artifact changed is measured again."""
    import torch

    from kvcompress.measure.prompt import prompt_eval
    from kvcompress.models import DTYPES, load_model

    from kvcompress import load_spec

    from kvcompress.calibration import artifact_for

    # The --model the ids were exported with (None: the embedded model, whose calibration artifact
    # kvcompress builds itself); kvpress reads the same weights from `folder`.
    model, _ = load_model(ids_file["model"]["argument"], dtype=DTYPES[dtype])
    ids = torch.tensor([ids_file["ids"]], dtype=torch.long)
    # a row is reused only for the same spec (a preset's name may come to mean another spec) and, for a
    # calibrated codec, the same calibration artifact (its figures move with the artifact's text)
    resolved = {spec: load_spec(spec).to_dict() for spec in specs}
    calibrated_on = {}
    for spec in specs:
        artifact = artifact_for(model, load_spec(spec), None)
        calibrated_on[spec] = None if artifact is None else artifact.metadata.get("tensors_sha256")
    done = {}
    if done_path is not None and done_path.is_file():
        for line in done_path.read_text().splitlines():
            row = json.loads(line) if line.strip() else None
            if (row and row.get("ids_sha256") == ids_file["ids_sha256"] and row.get("dtype") == dtype
                    and row.get("spec") in resolved and row.get("spec_dict") == resolved[row["spec"]]
                    and row.get("calibrated_on") == calibrated_on[row["spec"]]):
                done[row["spec"]] = row
    todo = [spec for spec in specs if spec not in done]
    store: dict = {}
    for spec in todo:
        result = prompt_eval(model, ids, spec, ids_file["protocol"]["context_tokens"], progress=False,
                             baseline_store=store)
        row = {"library": "kvcompress", "method": f"kvcompress {spec}", "spec": spec, "family": family(spec),
               "keep": result.kept_fraction, "context_compression": result.context_compression,
               "whole_cache_ratio": result.whole_cache_ratio, "kl": result.kl, "kl_ci95": list(result.kl_ci95),
               "ppl_change": result.ppl_change, "top1": result.top1, "ppl_baseline": result.ppl_baseline,
               "ids_sha256": ids_file["ids_sha256"], "dtype": dtype, "spec_dict": resolved[spec],
               "calibrated_on": calibrated_on[spec]}
        done[spec] = row
        if done_path is not None:
            with done_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        print(f"  {row['method']}: context {result.context_compression:.2f}x, KL {result.kl:.4f}", file=sys.stderr,
              flush=True)
    return [done[spec] for spec in specs]


def plot(rows: list[dict], path: Path) -> Path | None:
    """KL vs context compression: kvcompress's quantization, eviction and both, and kvpress's presses."""
    from kvcompress.experiments.plots import plot_kl_vs_compression

    points = [{"family": r.get("family") or "kvpress eviction (its presses)", "x": r["context_compression"],
               "kl": r["kl"], "label": r["method"].replace("kvcompress ", "").replace("kvpress ", "")}
              for r in rows]
    return plot_kl_vs_compression(points, path, "context compression (kvpress's count: context tokens / kept, "
                                                "x codec ratio; window and sinks not counted)")


def kvpress_rows(path: str, ids_file: dict) -> list[dict]:
    """The records of run_kvpress.py for the same ids, with KL intervals computed here."""
    import torch

    from kvcompress.measure.evaluate import bootstrap_intervals

    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            series = record["series"]
        except (ValueError, KeyError) as exc:
            raise UsageError(f"--kvpress {path} line {number} is not a run_kvpress.py record ({exc})") from None
        if record["environment"].get("ids_sha256") != ids_file["ids_sha256"]:
            raise UsageError(f"--kvpress {path} line {number} was measured on other ids than --ids; run run_kvpress.py "
                             "on the same --ids file")
        _, kl_ci, _ = bootstrap_intervals(torch.tensor(series["nll_baseline"]), torch.tensor(series["nll"]),
                                          torch.tensor(series["kl"]))
        rows.append({"library": "kvpress", "method": f"{record['method']}, keep {record['keep']:.0%}",
                     "keep": record["keep"], "context_compression": record["context_compression"],
                     "whole_cache_ratio": None, "kl": record["kl"], "kl_ci95": list(kl_ci),
                     "ppl_change": record["ppl_change"], "top1": record["top1"], "ppl_baseline": record["ppl_baseline"],
                     "environment": record["environment"]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | context compression | whole cache | KL (95% CI) | PPL change | top-1 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        whole = f"{r['whole_cache_ratio']:.2f}x" if r.get("whole_cache_ratio") else "n/a"
        lo, hi = r["kl_ci95"]
        lines.append(f"| {r['method']} | {r['context_compression']:.1f}x | {whole} | {r['kl']:.4f} ({lo:.4f} .. "
                     f"{hi:.4f}) | {r['ppl_change']:+.2%} | {r['top1']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export-ids", metavar="FILE", help="write the protocol's token ids and the model folder")
    parser.add_argument("--ids", metavar="FILE", help="an --export-ids file: measure on it")
    parser.add_argument("--context", type=int, default=1536, help="context tokens prefilled at once")
    parser.add_argument("--tokens", type=int, default=512, help="continuation tokens teacher-forced after it")
    parser.add_argument("--offset", type=int, default=0, help="first token read within the part")
    parser.add_argument("--part", default="report", choices=["report", "selection"],
                        help="with --export-ids: the part of the text read (selection: for references a choice is "
                             "made against, e.g. select_prompt_presets.py --references; default report)")
    from kvcompress.corpus import KINDS

    text = parser.add_mutually_exclusive_group()
    text.add_argument("--text", default=None, choices=KINDS, metavar="KIND",
                      help=f"with --export-ids: the kind of text whose report part is read, among {', '.join(KINDS)} "
                           "(default docs, as kvcompress eval --text)")
    text.add_argument("--corpus", default=None, metavar="FILE",
                      help="with --export-ids: instead of --text, a UTF-8 text file whose report part is read")
    parser.add_argument("--model", default=None, help="as kvcompress --model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--specs", default=DEFAULT_SPECS, help="comma list of kvcompress specs ('' for none)")
    parser.add_argument("--kvpress", metavar="FILE", help="JSON lines written by benchmarks/kvpress/run_kvpress.py")
    parser.add_argument("--out", help="folder for side_by_side.json, .md and .png (KL vs context compression); "
                        "kvcompress rows are kept in kvcompress_rows.jsonl there as they finish, and reused")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        print(f"side_by_side: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.export_ids:
        if args.context < 1 or args.tokens < 1:
            raise UsageError(f"--context and --tokens must be positive, got {args.context} and {args.tokens}")
        from kvcompress.corpus import CorpusError

        try:
            data = export_ids(args.export_ids, context=args.context, tokens=args.tokens, offset=args.offset,
                              model_name=args.model, dtype=args.dtype, kind=args.text, corpus=args.corpus,
                              part=args.part)
        except CorpusError as err:
            raise UsageError(f"--context {args.context} --tokens {args.tokens}: {err}") from None
        print(f"wrote {args.export_ids}: {len(data['ids'])} ids, model folder {data['model']['folder']}, "
              f"uncompressed PPL {data['baseline']['ppl']:.4f}")
        return 0
    if not args.ids:
        raise UsageError("pass --export-ids FILE (step 1) or --ids FILE (step 3); see the docstring")
    if not Path(args.ids).is_file():
        raise UsageError(f"--ids {args.ids}: no such file; write it with --export-ids")
    ids_file = json.loads(Path(args.ids).read_text())
    if args.text is not None or args.corpus is not None:
        raise UsageError(f"--text / --corpus choose the text of --export-ids; --ids {args.ids} already holds its text "
                         f"(kind {ids_file.get('text', {}).get('kind')!r}): drop them")
    rows = kvpress_rows(args.kvpress, ids_file) if args.kvpress else []
    specs = [s for s in args.specs.split(",") if s.strip()]
    done_path = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        done_path = Path(args.out) / "kvcompress_rows.jsonl"
    rows = kvcompress_rows(ids_file, specs, args.dtype, done_path) + rows
    table = markdown(rows)
    read = ids_file.get("text", {})
    print(f"text: tokens {read.get('tokens')} of the {read.get('part')} part of {read.get('kind') or read.get('source')}"
          f" ({read.get('source')})\n")
    print(table)
    if args.out:
        from kvcompress.io import write_json_atomic

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "side_by_side.json", {"protocol": ids_file["protocol"], "text": ids_file["text"],
                                                      "dtype": args.dtype, "rows": rows})
        (out / "side_by_side.md").write_text(table + "\n")
        picture = plot(rows, out / "side_by_side.png")
        if picture is not None:
            print(f"wrote {out / 'side_by_side.json'}, {out / 'side_by_side.md'} and {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

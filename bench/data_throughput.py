#!/usr/bin/env python
"""Tokens/s of the whole data pipeline (source → tokens → packed batches) for several `data.num_workers`.

    python bench/data_throughput.py                       # workers 0 1 2, 20 s each, 8 x 2048 rows, 32K vocab
    python bench/data_throughput.py --workers 2 --seconds 5 --seq-len 128 --vocab 2048

Offline: the tiny preset's demo corpus (prose/code/math streamed through `datasets`, weights 0.6/0.3/0.1) and a
byte-level BPE trained on it with `--vocab` tokens (both cached after the first run). Prints a markdown table.
Besides wall-clock tokens/s it reports tokens per CPU-second (training process + tokenizer workers), which does
not depend on what else the machine is doing, and the 1-minute load average during the run."""
import argparse, os, time

def _cpu_seconds(pids)->float:
    "User+system CPU seconds of other processes (Linux /proc; 0 elsewhere)."
    tick, total = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100, 0.0
    for pid in pids:
        try: f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
        except OSError: continue
        total += (int(f[11]) + int(f[12])) / tick  # utime, stime
    return total

def measure(workers:int, seconds:float, seq_len:int, batch:int, vocab:int, shuffle_buffer:int=1024)->dict:
    from smollm_kit.config import load_config
    from smollm_kit.data import PretrainData, load_tokenizer
    cfg = load_config('tiny', {'data.num_workers': workers, 'train.seq_len': seq_len, 'train.micro_batch_size': batch,
                               'model.max_seq_len': max(seq_len, 512), 'model.vocab_size': vocab, 'train.eval_batches': 1,
                               'data.shuffle_buffer': shuffle_buffer})
    tok = load_tokenizer(cfg)
    t0 = time.perf_counter()
    with PretrainData(cfg.data, tok, seq_len, batch, eval_batches=1, seed=cfg.run.seed) as data:
        data.next_batch()
        pool = data._feeder.pool
        pids = list(pool._processes) if pool is not None else []
        t1, c1, w1, n = time.perf_counter(), time.process_time(), _cpu_seconds(pids), 0
        while time.perf_counter() - t1 < seconds:
            n += data.next_batch()['input_ids'].numel()
        dt, cpu = time.perf_counter() - t1, time.process_time() - c1 + _cpu_seconds(pids) - w1
        return {'workers': workers, 'tokens_per_s': n/dt, 'tokens_per_cpu_s': n/cpu, 'startup_s': t1 - t0,
                'packing_efficiency': data.packing_efficiency, 'load': os.getloadavg()[0]}

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--seconds', type=float, default=20.0)
    p.add_argument('--seq-len', type=int, default=2048)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--vocab', type=int, default=32000)
    p.add_argument('--shuffle-buffer', type=int, default=1024, help='data.shuffle_buffer (0: file order)')
    a = p.parse_args()
    import datasets, torch, transformers  # noqa: F401  (import costs are not the pipeline's startup)
    print(f"# data pipeline throughput: demo corpus, byte-level BPE {a.vocab} tokens, batches {a.batch} x {a.seq_len}, "
          f"shuffle buffer {a.shuffle_buffer}, {os.cpu_count()} CPU cores, {a.seconds:.0f} s per setting\n")
    print("| data.num_workers | tokens/s | tokens per CPU-second | first batch after (s) | packing efficiency | load avg |")
    print("|---|---|---|---|---|---|")
    for w in a.workers:
        r = measure(w, a.seconds, a.seq_len, a.batch, a.vocab, a.shuffle_buffer)
        print(f"| {w} | {r['tokens_per_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} | {r['startup_s']:.2f} | "
              f"{r['packing_efficiency']:.4f} | {r['load']:.1f} |", flush=True)

if __name__ == '__main__': main()

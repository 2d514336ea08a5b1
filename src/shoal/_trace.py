"""Temporary step tracer: SHOAL_TRACE=dir -> each rank writes (step, label, t) rows."""
import os, time, atexit
DIR = os.environ.get("SHOAL_TRACE")
rows = []
rank = [None]
cur = [0]
def mark(label, step=-1):
    if step >= 0: cur[0] = step
    else: step = cur[0]
    if DIR:
        rows.append((step, label, time.perf_counter()))
        if len(rows) >= 2000:
            flush()
def flush():
    if DIR and rows:
        with open(os.path.join(DIR, f"r{rank[0]}_{os.getpid()}.txt"), "a") as f:
            for s, l, t in rows:
                f.write(f"{s} {l} {t:.7f}\n")
        rows.clear()

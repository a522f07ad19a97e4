"""Write the worked example's click log: ``python examples/clicklog/make_clicklog.py [ROWS] [OUT]``.

The log is drawn from moefast's synthetic generator (``paper`` preset, 6 domains, 2 numeric
fields with real signal) and written the way a product team's log looks: string ids, a site
name per domain, a multi-valued ``tags`` column, raw numeric columns (a positive ``price``, whose
log the click depends on, and ``dwell`` seconds), some empty values, and a ``request_id`` key.
Deterministic: the same ROWS give the same bytes.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np

import moefast

SITES = ("news", "video", "shop", "travel", "games", "music")


def make(rows: int, out: Path, seed: int = 7) -> Path:
    ds = moefast.data.load("synthetic", preset="paper", rows=rows, num_domains=len(SITES), numeric_fields=2,
                           numeric_scale=1.5, seed=seed)
    rng = np.random.default_rng(seed)
    parts = [ds.train, ds.val, ds.test]
    uid = np.concatenate([p.features["uid"].numpy() for p in parts])
    item = np.concatenate([p.features["item"].numpy() for p in parts])
    dom = np.concatenate([p.domain.numpy() for p in parts])
    x1 = np.concatenate([p.features["x1"].numpy() for p in parts]).astype(np.float64)
    x2 = np.concatenate([p.features["x2"].numpy() for p in parts]).astype(np.float64)
    label = np.concatenate([p.label.numpy() for p in parts]).astype(np.int64)
    order = rng.permutation(uid.size)  # the log's rows in no particular order
    n = uid.size
    price = np.round(np.exp(x1 + 3.0), 2)  # log1p-standardise recovers x1 (up to the +1)
    dwell = np.round(30.0 + 10.0 * x2, 1)
    price_missing = rng.random(n) < 0.02
    item_missing = rng.random(n) < 0.01
    tag_count = rng.integers(0, 5, n)
    lines = ["request_id,site,user,item,tags,price,dwell,click"]
    for k, i in enumerate(order):
        tags = "|".join(f"t{int(t)}" for t in rng.integers(0, 40, tag_count[i]))
        lines.append(",".join([
            f"r{k:07d}", SITES[dom[i]], f"u{uid[i]}", "" if item_missing[i] else f"i{item[i]}", tags,
            "" if price_missing[i] else f"{price[i]:.2f}", f"{dwell[i]:.1f}", str(label[i]),
        ]))
    out.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode()
    if out.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    out.write_bytes(data)
    return out


if __name__ == "__main__":
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 60_000
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).with_name("clicks.csv.gz")
    print(make(rows, target))

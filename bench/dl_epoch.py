"""One epoch of a PyTorch DataLoader over the files of a directory.

    python -m bench.dl_epoch DIR [--workers 4] [--batch-size 32]

Prints one JSON line: files, bytes, seconds (from creating the iterator,
which starts the workers, to the last batch). torch is imported before the
clock starts. Needs torch: `.venv/bin/pip install torch==2.13.0`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset


class FileDataset(Dataset):
    def __init__(self, root: str) -> None:
        self.paths = sorted(os.path.join(root, n) for n in os.listdir(root))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.paths[i], "rb", buffering=0) as f:
            data = f.read()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ds = FileDataset(args.root)
    gen = torch.Generator()
    gen.manual_seed(args.seed)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        generator=gen, drop_last=False)
    files = nbytes = 0
    t0 = time.perf_counter()
    for batch in loader:
        files += batch.shape[0]
        nbytes += batch.numel()
    dt = time.perf_counter() - t0
    print(json.dumps({"files": files, "bytes": nbytes, "seconds": dt}))


if __name__ == "__main__":
    main()

"""The memory test's subprocess (tests/test_stream_memory.py): ``python _stream_memory.py
stream|memory LOG SCHEMA_JSON VOCAB SHUFFLE_ROWS READ_AHEAD TINY`` reads the log's training
split through the streamed source (one epoch of batches) or loads it through the in-memory
source, and prints ``{"before_kib", "peak_kib"}``: ``ru_maxrss`` before and after the read.

``ru_maxrss`` is a process's lifetime peak, and importing torch peaks above where it settles:
the read runs in a child forked once everything is imported and the source is opened, whose
peak starts from the memory it actually holds then. The child first reads the small log
``TINY`` the same way (an epoch streamed, or a load in memory): the code's first use, which
faults the libraries' pages in again in a forked child, is then behind ``before``."""

from __future__ import annotations

import json
import os
import resource
import sys


def main() -> None:
    mode, log, schema, vocab = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    import torch

    import moefast
    from moefast.data import stream
    from moefast.data.batching import BatchOrder

    torch.set_num_threads(1)
    ds = stream.open_stream(log, schema, vocab, shuffle_rows=int(sys.argv[5]), read_ahead=int(sys.argv[6]))
    loader = stream.StreamLoader(ds.train, 256, order=BatchOrder.MIXED, shuffle_rows=ds.shuffle_rows,
                                 generator=0, read_ahead=ds.read_ahead)
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        with os.fdopen(read) as pipe:
            print(pipe.read())
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    os.close(read)
    code = 1
    try:
        tiny = sys.argv[7]
        if mode == "stream":
            warm = stream.open_stream(tiny, schema, vocab, shuffle_rows=int(sys.argv[5]), read_ahead=int(sys.argv[6]),
                                      check_files=False)
            for _ in stream.StreamLoader(warm.train, 256, shuffle_rows=warm.shuffle_rows, generator=0,
                                         read_ahead=warm.read_ahead):
                pass
            del warm
        else:
            moefast.data.load("table", path=tiny, schema=schema, vocab_from=vocab, use_cache=False, progress=False)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows = 0
        if mode == "stream":
            for batch in loader:
                rows += len(batch)
        else:
            mem = moefast.data.load("table", path=log, schema=schema, vocab_from=vocab, use_cache=False,
                                    progress=False)
            rows = len(mem.train)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        os.write(write, json.dumps({"before_kib": before, "peak_kib": peak, "rows": rows}).encode())
        code = 0
    finally:
        os._exit(code)

if __name__ == "__main__":
    main()

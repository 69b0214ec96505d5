"""The demo's job functions: a small interactive statistic and heavy bulk work."""

from __future__ import annotations

import collections
import lzma
import re
import time

from makeway import App

app = App()

_IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")


@app.job(tier="interactive", name="demo.file_statistic")
def file_statistic(path: str) -> dict:
    """Count lines and identifiers of one source file and return the most common identifier."""
    with open(path, "rb") as source:
        data = source.read()
    counts = collections.Counter(_IDENTIFIER.findall(data))
    common, uses = counts.most_common(1)[0] if counts else (b"", 0)
    return {"lines": data.count(b"\n"), "identifiers": sum(counts.values()), "most_common": common.decode(), "uses": uses}


@app.job(tier="bulk", name="demo.compress")
def compress(paths: list[str], preset: int = 9) -> dict:
    """Compress the files together with lzma at a high preset: seconds of CPU per batch."""
    compressor = lzma.LZMACompressor(preset=preset | lzma.PRESET_EXTREME)
    input_bytes = output_bytes = 0
    for path in paths:
        with open(path, "rb") as source:
            data = source.read()
        input_bytes += len(data)
        output_bytes += len(compressor.compress(data))
    output_bytes += len(compressor.flush())
    return {"input_bytes": input_bytes, "output_bytes": output_bytes}


@app.job(tier="bulk", name="demo.stream_memory")
def stream_memory(buffer_mb: int = 256, passes: int = 8) -> dict:
    """Copy a large buffer back and forth: work bound by memory bandwidth, not by the core."""
    source = bytearray(buffer_mb * 1024 * 1024)
    target = bytearray(len(source))
    started = time.perf_counter()
    for _ in range(passes):
        target[:] = source
        source[:] = target
    return {"input_bytes": 2 * passes * len(source), "seconds": time.perf_counter() - started}

"""A minimal line-plot rasteriser writing PNG bytes, so ``tunex plot`` works without matplotlib.

Draws a white canvas, the two axes and the curve (no text); that is enough to see a loss fall.
"""

from __future__ import annotations

import struct
import zlib

WIDTH, HEIGHT, MARGIN = 640, 360, 30


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def encode_png(pixels: list[bytearray], width: int, height: int) -> bytes:
    """RGB rows (``3 * width`` bytes each) -> PNG file bytes."""
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")
    )


def line_plot_png(points: list[tuple[float, float]]) -> bytes:
    """A PNG of the polyline through ``points`` scaled to fill the plot area."""
    rows = [bytearray(b"\xff" * 3 * WIDTH) for _ in range(HEIGHT)]

    def put(x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < WIDTH and 0 <= y < HEIGHT:
            rows[y][3 * x : 3 * x + 3] = bytes(rgb)

    for x in range(MARGIN, WIDTH - MARGIN // 2):
        put(x, HEIGHT - MARGIN, (0, 0, 0))
    for y in range(MARGIN // 2, HEIGHT - MARGIN + 1):
        put(MARGIN, y, (0, 0, 0))
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    sx = (WIDTH - 1.5 * MARGIN) / ((x1 - x0) or 1)
    sy = (HEIGHT - 1.5 * MARGIN) / ((y1 - y0) or 1)
    screen = [(int(MARGIN + (x - x0) * sx), int(HEIGHT - MARGIN - (y - y0) * sy)) for x, y in points]
    for (ax, ay), (bx, by) in zip(screen, screen[1:] or screen):
        steps = max(abs(bx - ax), abs(by - ay), 1)
        for i in range(steps + 1):
            x = round(ax + (bx - ax) * i / steps)
            y = round(ay + (by - ay) * i / steps)
            for dx, dy in ((0, 0), (1, 0), (0, 1)):
                put(x + dx, y + dy, (31, 119, 180))
    return encode_png(rows, WIDTH, HEIGHT)

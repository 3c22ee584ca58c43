"""The image formats spurguard decodes and the file suffixes that stand for them: one table.

Three places must agree on it: the server's decoder (which PIL formats it opens), the server's
dataset listing and the CLI's folder expansion (which files they pick up), or a folder silently
skips images that score fine when named one by one. Part of the shared vocabulary, so the
server's torch-side modules and the thin client read the same table.
"""

# PIL format name -> suffixes. Only formats whose PIL decoders run in-process and bounded (no EPS,
# which runs Ghostscript); each suffix is one PIL registers for its format.
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "WEBP": (".webp",),
    "GIF": (".gif",),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
    "PPM": (".ppm", ".pgm", ".pbm", ".pnm"),
    "AVIF": (".avif",),
}
IMAGE_SUFFIXES: tuple[str, ...] = tuple(suffix for suffixes in IMAGE_FORMATS.values() for suffix in suffixes)

"""Encoded image files to model inputs, inside the graph (what a bytes serving signature runs).

A model is trained on images a data module prepared; a client holding a PNG
or JPEG file should not have to repeat that preparation. `ImagePreprocessing`
describes it (target size, channels, inversion, resize method), generically:
a data module provides its own (`mtl_keras.data.omniglot.serving_preprocessing`),
and `decode_images` runs it in TensorFlow ops, so an export carries it.

The steps, per image: decode (PNG with `tf.io.decode_png`, JPEG with
`tf.io.decode_jpeg`, both with `channels` set, which is also what
`tf.io.decode_image(channels=...)` does; colour to grayscale is therefore
libpng's / libjpeg's conversion, the one a training pipeline that decodes
with `channels=1` applies) -> transparent pixels laid over `background`
(uint8) -> `255 - pixels` when `invert` (uint8, before any scaling) ->
`tf.image.convert_image_dtype` to float32 in [0, 1] -> when the size is not
the target size, `tf.image.resize` and clipping to [0, 1] (resizing to the
same size is skipped, as a pipeline that only resizes other sizes does).
Images of another aspect ratio are stretched to the target size. Images
larger than `MAX_PIXELS` are refused from their header, before decoding.

Example:

>>> prep = ImagePreprocessing(height=32, width=32, channels=1, invert=True)
>>> images = decode_images(tf.constant([open("a.png", "rb").read()]), prep)
>>> images.shape
TensorShape([1, 32, 32, 1])
"""

import dataclasses

import tensorflow as tf

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# 16 megapixels (4096 x 4096): decoding takes up to 4 bytes a pixel, so a few
# hundred MB at most per image.
MAX_PIXELS = 4096 * 4096
RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")

# What a client sends when it forgets the {"b64": ...} wrapper, or encodes twice:
# base64 text of a PNG / JPEG file starts with these.
_BASE64_PNG, _BASE64_JPEG = "iVBORw0KGgo", "/9j/"


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """How a model's input images were made from image files.

    Args:
        height: height of the model's input images.
        width: width of the model's input images.
        channels: 1 (grayscale) or 3 (RGB); files are converted to it.
        invert: `255 - pixels` (on 8-bit values) after decoding, e.g. to
            turn dark ink on light paper into light ink on a 0 background.
        resize_method: a `tf.image.resize` method, for files of another size.
        antialias: `tf.image.resize`'s `antialias` (smooths when shrinking).
        background: the 8-bit value transparent pixels are laid over,
            before any inversion (255: white paper).

    Example:

    >>> ImagePreprocessing(height=28, width=28, invert=True).to_json()["invert"]
    True
    """

    height: int
    width: int
    channels: int = 1
    invert: bool = False
    resize_method: str = "bilinear"
    antialias: bool = True
    background: int = 255

    def __post_init__(self):
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ImagePreprocessing.{name} must be a positive int; got {value!r}.")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"ImagePreprocessing.channels must be 1 (grayscale) or 3 (RGB); got {self.channels!r}.")
        if self.resize_method not in RESIZE_METHODS:
            raise ValueError(
                f"ImagePreprocessing.resize_method must be one of {', '.join(RESIZE_METHODS)} "
                f"(tf.image.resize's methods); got {self.resize_method!r}."
            )
        for name in ("invert", "antialias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ImagePreprocessing.{name} must be True or False; got {getattr(self, name)!r}.")
        if not isinstance(self.background, int) or isinstance(self.background, bool) or not 0 <= self.background <= 255:
            raise ValueError(f"ImagePreprocessing.background must be an int in [0, 255]; got {self.background!r}.")

    @property
    def shape(self):
        """`(height, width, channels)`: the shape of one preprocessed image."""
        return (self.height, self.width, self.channels)

    def to_json(self):
        """The description as a JSON-ready dict (what an export records)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data):
        """The inverse of `to_json`."""
        return cls(**data)


def check_requests(image_bytes):
    """Assertions that name what is wrong with a batch of encoded images.

    Each runs after the one before (the first problem is the one named):
    not a vector, an empty batch, empty strings, base64 text that was not
    decoded, GIF files, files that are neither PNG nor JPEG, animated PNGs,
    truncated files (no end-of-image marker).

    Args:
        image_bytes: string tensor, one encoded file per example.

    Returns:
        `image_bytes`, with the checks as control dependencies.
    """
    shape = tf.strings.reduce_join(tf.strings.as_string(tf.shape(image_bytes)), separator=",")
    with tf.control_dependencies([
        tf.debugging.Assert(tf.strings.regex_full_match(shape, r"\d+"),
                            ["image_bytes must be a vector of encoded image files, one per example; got shape",
                             shape]),
    ]):
        count = tf.size(image_bytes)
    with tf.control_dependencies([
        tf.debugging.Assert(count > 0, ["empty batch: send at least one image file."]),
    ]):
        image_bytes = tf.identity(image_bytes)
    head = tf.strings.substr(image_bytes, 0, 8)
    is_png = tf.equal(head, PNG_SIGNATURE)
    is_jpeg = tf.equal(tf.strings.substr(image_bytes, 0, 3), JPEG_SIGNATURE)
    base64_text = tf.logical_or(tf.strings.regex_full_match(tf.strings.substr(image_bytes, 0, 11), _BASE64_PNG),
                                tf.equal(tf.strings.substr(image_bytes, 0, 4), _BASE64_JPEG))
    is_gif = tf.equal(tf.strings.substr(image_bytes, 0, 4), b"GIF8")
    # An APNG announces its frames in an acTL chunk, which comes before the first IDAT.
    before_data = tf.strings.split(image_bytes, "IDAT", maxsplit=1).to_tensor(shape=[None, 1])[:, 0]
    animated = is_png & _contains(before_data, b"acTL")
    problems = [
        (tf.strings.length(image_bytes) == 0, "image_bytes is empty: send the bytes of each image file."),
        (base64_text,
         # No quotes: Assert prints them escaped.
         "image_bytes holds base64 text, not the decoded file: over REST send the JSON object "
         "{b64: <base64 of the file>} (the key b64, quoted), which the server decodes; in process send "
         "the bytes of the file."),
        (is_gif, "image_bytes is a GIF: send PNG or JPEG files (convert a GIF, e.g. with Pillow)."),
        (~(is_png | is_jpeg),
         "image_bytes is neither a PNG nor a JPEG file: send PNG or JPEG files as they are "
         "(convert other formats to PNG)."),
        (animated, "image_bytes is an animated PNG: send one still frame as a PNG or JPEG."),
        # A cut-off upload loses the end marker (PNG: the IEND chunk; JPEG: FF D9, which
        # byte stuffing keeps out of the compressed data).
        ((is_png & ~_contains(image_bytes, b"IEND")) | (is_jpeg & ~_contains(image_bytes, b"\xff\xd9")),
         "image_bytes is a truncated file (no end-of-image marker): send the whole file."),
    ]
    for bad, message in problems:
        with tf.control_dependencies([
            tf.debugging.Assert(~tf.reduce_any(bad), [message + " Examples:", tf.where(bad)[:, 0]], summarize=20),
        ]):
            image_bytes = tf.identity(image_bytes)
    return image_bytes


def _contains(strings, part):
    """Whether each string holds `part` (on bytes, no regex: files are not UTF-8)."""
    return tf.strings.split(strings, part).row_lengths() > 1


def decode_images(image_bytes, preprocessing, max_pixels=MAX_PIXELS):
    """Encoded PNG / JPEG files to a float32 `[B, height, width, channels]` batch in [0, 1].

    Files may be of any size up to `max_pixels`, grayscale or colour, with or
    without alpha (see the module docstring for the exact steps). Bad files
    fail with an `InvalidArgumentError` naming the problem and the examples
    (`check_requests`; larger images: their size, read from the file's
    header before decoding); a file that passes those checks but is damaged
    fails in the decoder ("Invalid PNG", "Invalid JPEG data").

    Args:
        image_bytes: string tensor `[B]`, one encoded file per example.
        preprocessing: an `ImagePreprocessing`.
        max_pixels: the largest height x width decoded (a small file can
            declare a huge image; decoding it would exhaust memory).

    Returns:
        float32 tensor `[B, height, width, channels]`.

    Example:

    >>> prep = ImagePreprocessing(height=8, width=8)
    >>> decode_images(tf.constant([png_bytes, jpeg_bytes]), prep).shape
    TensorShape([2, 8, 8, 1])
    """
    p = preprocessing
    image_bytes = check_requests(image_bytes)

    def decode(elems):
        data, index = elems
        is_png = tf.equal(tf.strings.substr(data, 0, 8), PNG_SIGNATURE)
        # Width and height as the header gives them (PNG: IHDR, big-endian;
        # JPEG: the frame header), so that no huge image is decoded.
        size = tf.cond(
            is_png,
            lambda: tf.reverse(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.int32, little_endian=False), [0]),
            lambda: tf.io.extract_jpeg_shape(data)[:2],
        )
        pixels = tf.reduce_prod(tf.cast(size, tf.int64))
        with tf.control_dependencies([
            tf.debugging.Assert(
                tf.reduce_all(size > 0) & (pixels <= max_pixels),
                ["image_bytes example", index, "is an image of (height, width)", size,
                 f"; the largest accepted is {max_pixels} pixels: send a smaller image."]),
        ]):
            data = tf.identity(data)

        def png():
            pixels = tf.io.decode_png(data, channels=p.channels)
            # decode_png drops alpha when asked for 1 or 3 channels; a
            # transparent pixel's colour is arbitrary (often black), so lay it
            # over the background as a viewer would. Only files that have
            # alpha (colour type 4 or 6, or a tRNS chunk) are touched: for
            # grayscale below 8 bits without tRNS, decode_png(channels=4)
            # fills alpha with 1, not 255 (TF 2.21).
            head = tf.strings.split(data, "IDAT", maxsplit=1)[0]
            colour_type = tf.strings.substr(data, 25, 1)  # IHDR is always the first chunk
            has_alpha = (tf.equal(colour_type, b"\x04") | tf.equal(colour_type, b"\x06")
                         | (tf.size(tf.strings.split(head, "tRNS")) > 1))

            def over_background():
                alpha = tf.io.decode_png(data, channels=4)[..., 3:]
                weight = tf.cast(alpha, tf.float32) / 255.0
                over = tf.round(tf.cast(pixels, tf.float32) * weight + float(p.background) * (1.0 - weight))
                return tf.where(alpha == 255, pixels, tf.cast(over, tf.uint8))

            return tf.cond(has_alpha, over_background, lambda: pixels)

        def jpeg():
            return tf.io.decode_jpeg(data, channels=p.channels)

        pixels = tf.cond(is_png, png, jpeg)
        if p.invert:
            # On 8-bit values, as a data module that inverts files before encoding them does.
            pixels = tf.constant(255, tf.uint8) - pixels
        image = tf.image.convert_image_dtype(pixels, tf.float32)
        same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], [p.height, p.width]))

        def resize():
            resized = tf.image.resize(image, (p.height, p.width), method=p.resize_method, antialias=p.antialias)
            return tf.clip_by_value(tf.cast(resized, tf.float32), 0.0, 1.0)

        image = tf.cond(same_size, lambda: image, resize)
        return tf.ensure_shape(image, p.shape)

    return tf.map_fn(decode, (image_bytes, tf.range(tf.size(image_bytes, out_type=tf.int64))),
                     fn_output_signature=tf.TensorSpec(p.shape, tf.float32))

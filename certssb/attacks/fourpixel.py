"""The ``fourpixel`` trigger (RAB / Cert-SSB), additive with nominal L2 norm ``delta``.

The four 4-neighbours of ``pixel`` (default the centre), every channel
``+= delta / sqrt(4 C)``, clipped to [0, 1]. Needs images of at least 3x3 pixels.
"""
from __future__ import annotations

from ..errors import CertssbError
from .onepixel import PixelTrigger
from .registry import register_trigger


@register_trigger("fourpixel", additive=True)
class FourPixel(PixelTrigger):
    margin = 1  # the neighbours must fit in the image

    def _check_shape(self) -> None:
        _, h, w = self.image_shape
        if h < 3 or w < 3:
            raise CertssbError(
                f"the fourpixel trigger needs images of at least 3x3 pixels (the four neighbours "
                f"of the centre), got {h}x{w}; use the onepixel or blending trigger")

    def _pixels(self) -> list[tuple[int, int]]:
        ch, cw = self.pixel
        return [(ch - 1, cw), (ch + 1, cw), (ch, cw - 1), (ch, cw + 1)]

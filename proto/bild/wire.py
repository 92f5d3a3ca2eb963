"""The wire's vocabulary: the names that clients, the HTTP API and the server give the proto's enums.

One table, so that a mode added to bild.proto is named in one place (`make proto` regenerates the
stubs in v1/; this module is written by hand).
"""

from __future__ import annotations

from bild.v1 import bild_pb2

# DecodingMode by name: the names of scheduler.request.Mode, the CLI's --mode and the HTTP API's "mode".
MODES = {
    "bild": bild_pb2.DECODING_MODE_BILD,
    "exact": bild_pb2.DECODING_MODE_EXACT,
    "large": bild_pb2.DECODING_MODE_LARGE,
    "small": bild_pb2.DECODING_MODE_SMALL,
}

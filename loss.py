"""`import loss` from a checkout, as the original ECAPA-TDNN code is used: the name is speakerkit.loss
itself."""

import sys

import speakerkit.loss

sys.modules[__name__] = speakerkit.loss

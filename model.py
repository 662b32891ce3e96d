"""`import model` from a checkout, as the original ECAPA-TDNN code is used: the name is speakerkit.model
itself."""

import sys

import speakerkit.model

sys.modules[__name__] = speakerkit.model

"""`import dataLoader` from a checkout, as the original ECAPA-TDNN code is used: the name is speakerkit.dataLoader
itself."""

import sys

import speakerkit.dataLoader

sys.modules[__name__] = speakerkit.dataLoader

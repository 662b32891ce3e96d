"""`import tools` from a checkout, as the original ECAPA-TDNN code is used: the name is speakerkit.tools
itself."""

import sys

import speakerkit.tools

sys.modules[__name__] = speakerkit.tools

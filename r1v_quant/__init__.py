"""r1v-quant: quantize Skywork-R1V for the hardware people own."""

__version__ = "0.1.0"

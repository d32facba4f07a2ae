"""quantkit.quant: schemes, quantize-dequantize math, bit packing, RTN and the quantized linear layer."""

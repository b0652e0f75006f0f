"""The quantization engine: formats, quantizer, calibration, format choice, clipping, rotation, GPTQ, recipes, quantize_ and the run-time layers."""

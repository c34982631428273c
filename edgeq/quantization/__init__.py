"""INT8 quantization: PTQ engines, QAT, sensitivity, the auto policy and its escalation."""

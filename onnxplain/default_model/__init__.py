"""The shipped default model: a small CNN trained by onnxplain on procedural shapes (see shapes.py).

Artefacts: shapes_cnn.onnx (input "input" Nx3x96x96, output "logits" Nx8), labels.txt, model.toml
(preprocessing x = (pixel/255 - 0.5)/0.5, stretched to 96x96) and samples/*.png (128x128).
Retrain with `python -m onnxplain.default_model.train` (needs torch; never imported by the server).
"""

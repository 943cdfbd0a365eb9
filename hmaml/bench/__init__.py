"""Benchmarks: each prints figures and one JSON object last, and asserts nothing.

``adapt`` (adaptation speed), ``train`` (training speed against the kernel limit), ``loader``
(the episodic stream), ``gpu`` (the GPU check) and ``equivalence`` (CPU against another device in
float64); ``hmaml bench COMMAND`` runs one. Nothing outside this package and the commands imports
it.
"""

"""Training: the Accelerate loop, atomic checkpoints for exact resume, and MLflow tracking.

Import the submodules directly (``hmaml.train.checkpoint``, ``hmaml.train.tracking``); this
package file imports nothing so that reading one of them never pulls in the others.
"""

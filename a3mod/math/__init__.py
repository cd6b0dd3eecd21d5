"""Pure tensor math (never imports transformers): the closed-form solvers (solvers.py) and factorizations
(factorize.py)."""

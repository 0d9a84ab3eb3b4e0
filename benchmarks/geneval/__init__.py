"""GenEval: judging rules shared by the toy judge and real object detectors."""

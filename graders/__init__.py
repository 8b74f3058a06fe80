"""The exercises' graders, one module per lesson (graders.lesson01 ... graders.lesson08), all reporting the same way
(graders.harness). They import qlora_ref to compare a learner's function with the reference; qlora_ref never
imports them.
"""

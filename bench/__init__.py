"""The course's GPU benchmarks, outside the reference package: each module is a command run from the project's root,
`python -m bench.<name>`, that writes its results to bench/results/ (the lessons read them with qlora_ref.results).
"""

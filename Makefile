# Routine commands (run inside the project's virtual environment).
.PHONY: format lint typecheck test test-fast bench
format:
	ruff format opendino tests bench tools
	ruff check --fix opendino tests bench tools
lint:
	ruff check opendino tests bench tools
	ruff format --check opendino tests bench tools
typecheck:
	mypy
test:
	python -m pytest
test-fast:
	python -m pytest -m "not slow and not dist"
bench:
	python bench/inference.py

"""Resumable command-line jobs: they write files, tables and plots; the maths they call lives in the modules above."""

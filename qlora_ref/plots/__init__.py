"""Plots behind the lessons' widgets: plain functions, one module per lesson, tested directly."""

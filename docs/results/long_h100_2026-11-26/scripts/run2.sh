#!/bin/bash
set -u
cp .dev2/x2 /tmp/stage/ && ls -l /tmp/stage

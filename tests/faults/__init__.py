"""Fault-injection suite (issue 8, part 1): smt-watch held against crashes, flaky targets, full disks,
broken SFTP servers, event floods and bad input. Every test is marked ``faults``; see each module's
docstring for what was scaled down from the issue and why."""

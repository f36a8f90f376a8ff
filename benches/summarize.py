"""Prints medians and spreads from the files benches/run-all.sh produces.

    summarize.py hyperfine RESULTS.json        medians and quartiles, per command
    summarize.py criterion UNIT DIR...         criterion medians, MAD and 95% CI (UNIT: us or ms)
"""
import json
import statistics
import sys


def hyperfine(path):
    for result in json.load(open(path))["results"]:
        times = sorted(result["times"])
        quarter, three_quarters = times[len(times) // 4], times[3 * len(times) // 4]
        print(f'{result["command"]:36} median {statistics.median(times) * 1000:.1f} ms  '
              f'IQR {quarter * 1000:.1f}-{three_quarters * 1000:.1f} ms')


def criterion(unit, directories):
    scale = {"us": 1e3, "ms": 1e6}[unit]
    for directory in directories:
        estimates = json.load(open(f"{directory}/new/estimates.json"))
        median, mad = estimates["median"], estimates["median_abs_dev"]
        low, high = median["confidence_interval"]["lower_bound"], median["confidence_interval"]["upper_bound"]
        name = directory.split("criterion/", 1)[-1]
        print(f'{name:55} median {median["point_estimate"] / scale:.1f} {unit}  '
              f'MAD {mad["point_estimate"] / scale:.1f} {unit}  CI {low / scale:.1f}-{high / scale:.1f} {unit}')


if __name__ == "__main__":
    if sys.argv[1] == "hyperfine":
        hyperfine(sys.argv[2])
    else:
        criterion(sys.argv[2], sys.argv[3:])

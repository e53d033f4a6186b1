"""A department's request for a head: ICU mortality, from the ICU rows of one hospital's file.

Sends the labelled rows to the hospital's prediction server (POST /v1/heads), waits for the job and
prints its metrics. The rows stay at the hospital: the server is the hospital's own.

    python examples/hospitals/icu_head_request.py data/hospitals/hospital_003.csv --key $DEPT_KEY [--url http://127.0.0.1:8080]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import httpx
import pandas as pd

FEATURES = ["age", "sex", "admission_type", "ward", "prior_admissions", "charlson_index", "heart_rate", "systolic_bp", "creatinine", "hemoglobin", "sodium", "wbc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--key", required=True, help="an API key with the department role")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--promote", action="store_true", help="serve the new head as soon as it is trained")
    args = parser.parse_args()

    frame = pd.read_csv(args.csv)
    icu = frame[(frame["ward"] == "icu") & frame["died_in_hospital"].notna()]
    if len(icu) < 8:
        sys.exit(f"{args.csv}: only {len(icu)} labelled ICU rows; pick a larger hospital")
    rows = json.loads(icu[FEATURES].assign(icu_mortality=icu["died_in_hospital"].astype(int).map({0: "survived", 1: "died"})).to_json(orient="records"))
    headers = {"Authorization": f"Bearer {args.key}"}
    body = {"task": "icu_mortality", "kind": "binary", "rows": rows, "promote": args.promote}
    response = httpx.post(f"{args.url}/v1/heads", json=body, headers=headers, timeout=30)
    if response.status_code != 202:
        sys.exit(f"{response.status_code}: {response.json()['error']}")
    job_url = args.url + response.json()["status_url"]
    print(f"sent {len(rows)} ICU rows; job {response.json()['job']}")
    while (job := httpx.get(job_url, headers=headers).json())["status"] in ("queued", "running"):
        time.sleep(0.5)
    print(json.dumps(job, indent=2))


if __name__ == "__main__":
    main()

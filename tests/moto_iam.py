#!/usr/bin/env python3
"""Sets up moto's S3 server for the roles test: a bucket, one IAM user per
policy file in deploy/iam (BUCKET replaced), access keys, then turns IAM
enforcement on. Prints the keys as JSON.

usage: moto_iam.py ENDPOINT BUCKET POLICY_DIR
"""
import json
import os
import sys
import urllib.request

import boto3

endpoint, bucket, policy_dir = sys.argv[1], sys.argv[2], sys.argv[3]
session = boto3.Session(aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1")
s3 = session.client("s3", endpoint_url=endpoint)
iam = session.client("iam", endpoint_url=endpoint)
s3.create_bucket(Bucket=bucket)
keys = {}
for name in sorted(os.listdir(policy_dir)):
    if not name.endswith(".json") or name == "lifecycle.json":
        continue
    user = name[: -len(".json")]
    document = open(os.path.join(policy_dir, name)).read().replace("BUCKET", bucket)
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName=user, PolicyDocument=document)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    keys[user] = {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}
# From here on every request is checked against the users' policies. The
# body must not be form-encoded, or the server does not see it.
request = urllib.request.Request(
    f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
)
with urllib.request.urlopen(request) as response:
    assert response.status == 200, response.status
print(json.dumps(keys))

# A module written for Azure IoT Edge with the official Python SDK: it
# configures itself from the edge environment only, then sends SEND_COUNT
# messages (every SEND_INTERVAL seconds) to the output SEND_OUTPUT, each with
# a unique message id (<pid>-<n>), application properties alert (true for
# even n) and n, and a JSON body. It prints one line per message sent and
# then stays up.
import json
import os
import sys
import time

from azure.iot.device import IoTHubModuleClient, Message

client = IoTHubModuleClient.create_from_edge_environment()
client.connect()
count = int(os.environ.get("SEND_COUNT", "10"))
interval = float(os.environ.get("SEND_INTERVAL", "0"))
output = os.environ.get("SEND_OUTPUT", "out1")
run = os.getpid()
print(json.dumps({"ready": run}), flush=True)
for n in range(count):
    msg = Message(json.dumps({"n": n, "run": run}))
    msg.message_id = "%d-%d" % (run, n)
    msg.content_type = "application/json"
    msg.content_encoding = "utf-8"
    msg.custom_properties["alert"] = "true" if n % 2 == 0 else "false"
    msg.custom_properties["n"] = str(n)
    client.send_message_to_output(msg, output)
    print(json.dumps({"sent": msg.message_id}), flush=True)
    if interval:
        time.sleep(interval)
print(json.dumps({"done": count}), flush=True)
while True:
    time.sleep(3600)

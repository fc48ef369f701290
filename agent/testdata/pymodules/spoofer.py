# A misbehaving module written with the official Python SDK: it sends one
# proper message, then one whose application properties try to pose as
# another module ($.cdid, $.cmid are the hub's own names), which the hub
# must refuse without delivering it or disturbing anyone else.
import json
import threading
import time

from azure.iot.device import IoTHubModuleClient, Message

client = IoTHubModuleClient.create_from_edge_environment()
client.connect()
good = Message("honest")
good.custom_properties["alert"] = "true"
client.send_message_to_output(good, "out1")
print(json.dumps({"sent": "honest"}), flush=True)

bad = Message("spoofed")
bad.custom_properties["alert"] = "true"
bad.custom_properties["$.cmid"] = "someone-else"
bad.custom_properties["$.cdid"] = "another-device"
# The hub disconnects a 3.1.1 client for it: the SDK keeps retrying, so
# send it on a thread of its own.
threading.Thread(target=lambda: client.send_message_to_output(bad, "out1"), daemon=True).start()
print(json.dumps({"sent": "spoofed"}), flush=True)
while True:
    time.sleep(3600)

# A module written for Azure IoT Edge with the official Python SDK: it
# configures itself from the edge environment only, prints every input
# message, its twin at start and every desired properties patch (one JSON
# line each, with its pid), reports what it saw as reported properties, and
# answers direct methods.
import json
import os
import time

from azure.iot.device import IoTHubModuleClient, MethodResponse

client = IoTHubModuleClient.create_from_edge_environment()
pid = os.getpid()


def out(**kw):
    kw["pid"] = pid
    print(json.dumps(kw, sort_keys=True), flush=True)


def on_message(msg):
    out(input=msg.input_name, id=msg.message_id, props=msg.custom_properties,
        body=msg.data.decode("utf-8"), contentType=msg.content_type)


def on_patch(patch):
    out(patch=patch)
    client.patch_twin_reported_properties({"lastPatchVersion": patch.get("$version"), "interval": patch.get("interval")})


def on_method(req):
    if req.name == "sleep":
        return  # never answers
    client.send_method_response(MethodResponse.create_from_method_request(req, 200, {"method": req.name, "echo": req.payload}))


client.on_message_received = on_message
client.on_twin_desired_properties_patch_received = on_patch
client.on_method_request_received = on_method
client.connect()
twin = client.get_twin()
out(twin=twin)
client.patch_twin_reported_properties({"started": True, "desiredVersion": twin["desired"]["$version"]})
while True:
    time.sleep(3600)

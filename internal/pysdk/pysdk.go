// Package pysdk finds the official Azure IoT Python device SDK for the
// tests that run modules written with it: Debian's /usr/bin/python3 with
// the SDK checked out beside the repository (see
// /work/shared/thirdparty/azure-iot-sdk-python/SOURCE.md).
package pysdk

import (
	"os/exec"
	"path/filepath"
	"testing"

	"appliance/internal/testenv"
)

// Python is the interpreter the SDK runs on with Debian's packages.
const Python = "/usr/bin/python3"

// Relative is where the SDK is from a package directory of the repository.
const Relative = "../../shared/thirdparty/azure-iot-sdk-python/azure-iot-device"

// Find returns the interpreter and the SDK's directory (for PYTHONPATH) once
// it has checked that the SDK imports. Without them the test is skipped,
// except under CI, where it fails (testenv.Missing): CI installs them.
func Find(t testing.TB) (python, sdk string) {
	t.Helper()
	sdk, _ = filepath.Abs(Relative)
	cmd := exec.Command(Python, "-c", "from azure.iot.device import IoTHubModuleClient, Message, MethodResponse")
	cmd.Env = []string{"PYTHONPATH=" + sdk}
	if out, err := cmd.CombinedOutput(); err != nil {
		testenv.Missing(t, "the Azure IoT Python SDK does not import with %s and %s (apt-get install python3-paho-mqtt python3-requests python3-requests-unixsocket python3-janus python3-socks python3-deprecation python3-typing-extensions): %v\n%s", Python, sdk, err, out)
	}
	return Python, sdk
}

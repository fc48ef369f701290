// Command edgemodule is a small IoT Edge module of our own, for the
// docker-runtime e2e test: configured from its IOTEDGE_* environment only,
// it gets the trust bundle and a SAS token from its workload socket,
// connects to the hub by IOTEDGE_GATEWAYHOSTNAME (TLS verified with the
// trust bundle, host name included), sends SEND_COUNT messages
// "hello-<module>-<n>" to its output out1, echoes every message of its
// input in1 to its output echo, and prints every input message as a JSON
// line. It runs as a container FROM scratch and as a process module.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"time"

	"appliance/internal/edgeclient"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "edgemodule:", err)
		os.Exit(1)
	}
}

func run() error {
	env, err := edgeclient.EnvFromOS()
	if err != nil {
		return err
	}
	ctx := context.Background()
	var m *edgeclient.Module
	for attempt := 0; ; attempt++ {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		cfg, err := env.Config(cctx)
		if err == nil {
			m, err = edgeclient.ConnectModule(cctx, cfg, env.DeviceID, env.ModuleID)
		}
		cancel()
		if err == nil {
			break
		}
		if attempt == 30 {
			return err
		}
		fmt.Fprintln(os.Stderr, "edgemodule: connect:", err)
		time.Sleep(time.Second)
	}
	if err := m.SubscribeInputs(ctx); err != nil {
		return err
	}
	out := json.NewEncoder(os.Stdout)
	_ = out.Encode(map[string]any{"connected": env.ModuleID, "gateway": env.Gateway})
	count, _ := strconv.Atoi(os.Getenv("SEND_COUNT"))
	go func() {
		for n := range count {
			body := fmt.Sprintf("hello-%s-%d", env.ModuleID, n)
			if err := m.SendOutput(ctx, "out1", map[string]string{"n": strconv.Itoa(n)}, []byte(body)); err != nil {
				fmt.Fprintln(os.Stderr, "edgemodule: send:", err)
				os.Exit(1)
			}
		}
	}()
	for {
		select {
		case msg := <-m.Messages():
			in, ok := m.ParseInput(msg)
			if !ok {
				continue
			}
			_ = out.Encode(map[string]any{"input": in.Name, "body": string(in.Body), "props": in.Properties})
			if in.Name == "in1" {
				props := map[string]string{"echoed-by": env.ModuleID}
				if err := m.SendOutput(ctx, "echo", props, in.Body); err != nil {
					return err
				}
			}
		case <-m.Done():
			return m.Err()
		}
	}
}

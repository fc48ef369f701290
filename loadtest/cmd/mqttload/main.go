// Command mqttload is one process of the MQTT load generator (package
// loadtest): it holds device connections, or publishes for the mosquitto
// baseline. TestLoad in loadtest/load_test.go starts several of them; run
// by hand:
//
//	mqttload connect --addr 127.0.0.1:1883 --devices-file devs.txt --from 0 --count 10000 [--source-ip 127.0.0.11]
//	mqttload publish --addr 127.0.0.1:1883 --devices-file devs.txt --count 10000 --payload-file doc.json
//
// connect reads commands on stdin (see loadtest.RunShard); both report JSON
// events on stdout.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"appliance/loadtest"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: mqttload connect|publish [flags] (-h for the flags)")
		os.Exit(2)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	var err error
	switch os.Args[1] {
	case "connect":
		err = connect(ctx, os.Args[2:])
	case "publish":
		err = publish(ctx, os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q: want connect or publish", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mqttload:", err)
		os.Exit(1)
	}
}

func readDevices(path string, from, count int) ([]loadtest.Device, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	devs, err := loadtest.ReadDevices(f, from, count)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return devs, nil
}

func connect(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("connect", flag.ExitOnError)
	var cfg loadtest.ShardConfig
	var file string
	var from, count, qos int
	fs.StringVar(&cfg.Addr, "addr", "127.0.0.1:1883", "broker host:port")
	fs.StringVar(&file, "devices-file", "", `"id key" lines`)
	fs.IntVar(&from, "from", 0, "first line of --devices-file to use (0-based)")
	fs.IntVar(&count, "count", 0, "devices to connect (0: all from --from)")
	fs.StringVar(&cfg.SourceIP, "source-ip", "", "local address to connect from, e.g. 127.0.0.11")
	fs.StringVar(&cfg.TopicTemplate, "topic", "appliance/devices/{id}/desired", "topic each device subscribes to; {id} is its id")
	fs.IntVar(&qos, "qos", 1, "subscription QoS")
	fs.IntVar(&cfg.Concurrency, "concurrency", 64, "connects in flight at once")
	fs.DurationVar(&cfg.Keepalive, "keepalive", 300*time.Second, "MQTT keepalive (pings at half of it)")
	fs.DurationVar(&cfg.Timeout, "timeout", 30*time.Second, "bound on each connect and subscribe")
	_ = fs.Parse(args)
	if file == "" {
		return fmt.Errorf("--devices-file is required")
	}
	cfg.QoS = byte(qos)
	var err error
	if cfg.Devices, err = readDevices(file, from, count); err != nil {
		return err
	}
	return loadtest.RunShard(ctx, cfg, os.Stdin, os.Stdout)
}

func publish(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("publish", flag.ExitOnError)
	var cfg loadtest.PublisherConfig
	var file, payloadFile, topic string
	var from, count, qos int
	fs.StringVar(&cfg.Addr, "addr", "127.0.0.1:1883", "broker host:port")
	fs.StringVar(&cfg.ClientID, "client-id", "mqttload-publisher", "publisher's client id (and user name)")
	fs.StringVar(&cfg.Password, "password", "", "publisher's password")
	fs.StringVar(&file, "devices-file", "", `"id key" lines: one message to each device's topic`)
	fs.IntVar(&from, "from", 0, "first line of --devices-file to use (0-based)")
	fs.IntVar(&count, "count", 0, "messages: devices from --devices-file, or copies to --topic without {id}")
	fs.StringVar(&topic, "topic", "appliance/devices/{id}/desired", "topic per message; {id} is a device id")
	fs.StringVar(&payloadFile, "payload-file", "", "message payload")
	fs.IntVar(&qos, "qos", 1, "QoS")
	fs.IntVar(&cfg.Window, "window", 1000, "QoS 1 messages awaiting PUBACK at once")
	_ = fs.Parse(args)
	cfg.Username, cfg.QoS = cfg.ClientID, byte(qos)
	if payloadFile != "" {
		var err error
		if cfg.Payload, err = os.ReadFile(payloadFile); err != nil {
			return err
		}
	}
	if file != "" {
		devs, err := readDevices(file, from, count)
		if err != nil {
			return err
		}
		for _, d := range devs {
			cfg.Topics = append(cfg.Topics, loadtest.Topic(topic, d.ID))
		}
	} else {
		for range max(count, 1) {
			cfg.Topics = append(cfg.Topics, topic)
		}
	}
	return loadtest.RunPublisher(ctx, cfg, os.Stdout)
}

package edgeclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// Env is an IoT Edge module's environment, as the agent sets it.
type Env struct {
	HubName, DeviceID, ModuleID, Gateway, GenerationID, WorkloadURI, APIVersion string
}

// EnvFromOS reads IOTEDGE_IOTHUBHOSTNAME, _DEVICEID, _MODULEID,
// _GATEWAYHOSTNAME, _MODULEGENERATIONID, _WORKLOADURI and _APIVERSION.
func EnvFromOS() (Env, error) {
	e := Env{
		HubName: os.Getenv("IOTEDGE_IOTHUBHOSTNAME"), DeviceID: os.Getenv("IOTEDGE_DEVICEID"),
		ModuleID: os.Getenv("IOTEDGE_MODULEID"), Gateway: os.Getenv("IOTEDGE_GATEWAYHOSTNAME"),
		GenerationID: os.Getenv("IOTEDGE_MODULEGENERATIONID"), WorkloadURI: os.Getenv("IOTEDGE_WORKLOADURI"),
		APIVersion: os.Getenv("IOTEDGE_APIVERSION"),
	}
	for name, v := range map[string]string{"IOTEDGE_IOTHUBHOSTNAME": e.HubName, "IOTEDGE_DEVICEID": e.DeviceID,
		"IOTEDGE_MODULEID": e.ModuleID, "IOTEDGE_GATEWAYHOSTNAME": e.Gateway, "IOTEDGE_MODULEGENERATIONID": e.GenerationID,
		"IOTEDGE_WORKLOADURI": e.WorkloadURI, "IOTEDGE_APIVERSION": e.APIVersion} {
		if v == "" {
			return e, fmt.Errorf("IoT Edge environment not set: %s is empty", name)
		}
	}
	return e, nil
}

func (e Env) workload() (*http.Client, error) {
	path, ok := strings.CutPrefix(e.WorkloadURI, "unix://")
	if !ok {
		return nil, fmt.Errorf("IOTEDGE_WORKLOADURI %q is not unix://", e.WorkloadURI)
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}, nil
}

// TrustBundle asks the workload API for the CA that verifies the hub.
func (e Env) TrustBundle(ctx context.Context) ([]byte, error) {
	hc, err := e.workload()
	if err != nil {
		return nil, err
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://workload/trust-bundle?api-version="+url.QueryEscape(e.APIVersion), nil)
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var tb struct {
		Certificate string `json:"certificate"`
	}
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return nil, fmt.Errorf("trust bundle: %s %s", resp.Status, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(&tb); err != nil {
		return nil, err
	}
	return []byte(tb.Certificate), nil
}

// Sign asks the workload API to sign data with the module's key.
func (e Env) Sign(ctx context.Context, data string) (string, error) {
	hc, err := e.workload()
	if err != nil {
		return "", err
	}
	body, _ := json.Marshal(map[string]string{"keyId": "primary", "algo": "HMACSHA256", "data": base64.StdEncoding.EncodeToString([]byte(data))})
	u := fmt.Sprintf("http://workload/modules/%s/genid/%s/sign?api-version=%s", url.PathEscape(e.ModuleID), url.PathEscape(e.GenerationID), url.QueryEscape(e.APIVersion))
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return "", fmt.Errorf("sign: %s %s", resp.Status, b)
	}
	var out struct {
		Digest string `json:"digest"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return "", err
	}
	return out.Digest, nil
}

// Token builds a SAS token signed through the workload API, as
// azure-iot-device's RenewableSasToken does.
func (e Env) Token(ctx context.Context, ttl time.Duration) (string, error) {
	sr := Escape(e.HubName + "/devices/" + e.DeviceID + "/modules/" + e.ModuleID)
	se := strconv.FormatInt(time.Now().Add(ttl).Unix(), 10)
	sig, err := e.Sign(ctx, sr+"\n"+se)
	if err != nil {
		return "", err
	}
	return "SharedAccessSignature sr=" + sr + "&sig=" + Escape(sig) + "&se=" + se, nil
}

// Config is the connection a module makes: to IOTEDGE_GATEWAYHOSTNAME:8883
// over TLS verified with the trust bundle (and the host name), as
// {device}/{module} with a fresh SAS token.
func (e Env) Config(ctx context.Context) (Config, error) {
	ca, err := e.TrustBundle(ctx)
	if err != nil {
		return Config{}, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return Config{}, errors.New("trust bundle holds no certificate")
	}
	token, err := e.Token(ctx, time.Hour)
	if err != nil {
		return Config{}, err
	}
	return Config{
		Addr:     net.JoinHostPort(e.Gateway, "8883"),
		TLS:      &tls.Config{RootCAs: pool, ServerName: e.Gateway, MinVersion: tls.VersionTLS12},
		ClientID: e.DeviceID + "/" + e.ModuleID,
		Username: e.HubName + "/" + e.DeviceID + "/" + e.ModuleID + "/?api-version=2019-10-01&DeviceClientType=appliance-edgeclient",
		Password: token,
	}, nil
}

// Module is a connected module.
type Module struct {
	*Client
	Device, Name string
}

// ConnectModule dials with cfg as module device/name.
func ConnectModule(ctx context.Context, cfg Config, device, name string) (*Module, error) {
	c, err := Dial(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return &Module{Client: c, Device: device, Name: name}, nil
}

// EventsTopic is where the module sends messages, with a property bag.
func (m *Module) EventsTopic(output string, props map[string]string, system ...[2]string) string {
	var sys [][2]string
	if output != "" {
		sys = append(sys, [2]string{"$.on", output})
	}
	sys = append(sys, system...)
	return "devices/" + m.Device + "/modules/" + m.Name + "/messages/events/" + Bag(sys, props)
}

// SendOutput sends body to an output, at QoS 1, and waits for the PUBACK.
func (m *Module) SendOutput(ctx context.Context, output string, props map[string]string, body []byte) error {
	return m.Publish(ctx, m.EventsTopic(output, props), body, 1)
}

// SubscribeInputs subscribes to the module's inputs.
func (m *Module) SubscribeInputs(ctx context.Context) error {
	codes, err := m.Subscribe(ctx, "devices/"+m.Device+"/modules/"+m.Name+"/inputs/#")
	if err != nil {
		return err
	}
	if len(codes) != 1 || codes[0] > 1 {
		return fmt.Errorf("inputs subscription refused: %v", codes)
	}
	return nil
}

// Input is a message received on an input.
type Input struct {
	Name       string
	Properties map[string]string
	Body       []byte
}

// ParseInput reads an input topic: devices/{d}/modules/{m}/inputs/{input}/{bag}.
func (m *Module) ParseInput(msg Message) (Input, bool) {
	rest, ok := strings.CutPrefix(msg.Topic, "devices/"+m.Device+"/modules/"+m.Name+"/inputs/")
	if !ok {
		return Input{}, false
	}
	name, bag, _ := strings.Cut(rest, "/")
	name, _ = url.PathUnescape(name)
	return Input{Name: name, Properties: ParseBag(bag), Body: msg.Payload}, true
}

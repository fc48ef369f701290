package workload

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"appliance/internal/fsutil"
)

// Identity is a module's identity on this device, as IoT Edge keeps one
// per module: a generation id that changes whenever the identity is
// recreated (the module left the deployment and came back), and a
// symmetric key that signs its SAS tokens.
type Identity struct {
	GenerationID string `json:"generationId"`
	Key          []byte `json:"key"`
}

// identitiesFile is the registry on disk: module name → identity.
type identitiesFile struct {
	Modules map[string]Identity `json:"modules"`
}

func loadIdentities(path string) (map[string]Identity, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return map[string]Identity{}, nil
	}
	if err != nil {
		return nil, err
	}
	var f identitiesFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("%s is corrupt (remove it to give every module a new identity): %w", path, err)
	}
	for name, id := range f.Modules {
		if id.GenerationID == "" || len(id.Key) < 16 {
			return nil, fmt.Errorf("%s is corrupt: module %q has no generation id or key", path, name)
		}
	}
	if f.Modules == nil {
		f.Modules = map[string]Identity{}
	}
	return f.Modules, nil
}

func saveIdentities(path string, ids map[string]Identity) error {
	data, err := json.Marshal(identitiesFile{Modules: ids})
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(path, data, 0o600)
}

// newIdentity makes a fresh generation id (a random decimal, as IoT Edge's
// look) and a 256-bit key.
func newIdentity() (Identity, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return Identity{}, err
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return Identity{}, err
	}
	return Identity{GenerationID: strconv.FormatInt(n.Int64()+1<<62, 10), Key: key}, nil
}

// sign is the workload API's signature: HMAC-SHA256 of data with the key.
func sign(key, data []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(data)
	return m.Sum(nil)
}

// Errors of VerifySAS; every one matches ErrUnauthorized.
var (
	ErrUnauthorized = errors.New("not authorized")
	errMalformed    = fmt.Errorf("%w: malformed SAS token", ErrUnauthorized)
)

// resource is the SAS resource of a module, as the SDKs write it
// (azure-iot-device's _form_sas_uri): {hub}/devices/{device}/modules/{module}.
func resource(hub, device, module string) string {
	return hub + "/devices/" + device + "/modules/" + module
}

// VerifySAS checks an IoT Hub SAS token, "SharedAccessSignature
// sr=<url-encoded resource>&sig=<url-encoded base64 signature>&se=<expiry,
// Unix seconds>[&skn=<key name>]" (fields in any order), against a module's
// key: the resource must be exactly {hub}/devices/{device}/modules/{module}
// (the hub name ignoring case, as host names), the expiry in the future,
// and the signature HMAC-SHA256(key, <sr as sent> + "\n" + <se>). A key
// name (skn) is refused: modules sign with their own key, not a policy's.
func VerifySAS(token, hub, device, module string, key []byte, now time.Time) error {
	_, err := verifySAS(token, hub, device, module, key, now)
	return err
}

// verifySAS is VerifySAS, returning the token's expiry too.
func verifySAS(token, hub, device, module string, key []byte, now time.Time) (time.Time, error) {
	rest, ok := strings.CutPrefix(token, "SharedAccessSignature ")
	if !ok {
		return time.Time{}, errMalformed
	}
	fields := map[string]string{}
	for _, kv := range strings.Split(rest, "&") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return time.Time{}, errMalformed
		}
		if _, dup := fields[k]; dup {
			return time.Time{}, errMalformed
		}
		fields[k] = v
	}
	sr, sig, se := fields["sr"], fields["sig"], fields["se"]
	if sr == "" || sig == "" || se == "" || len(fields) != 3 {
		if _, skn := fields["skn"]; skn {
			return time.Time{}, fmt.Errorf("%w: a SAS token with a key name (skn) is a policy's; a module signs with its own key", ErrUnauthorized)
		}
		return time.Time{}, errMalformed
	}
	res, err := url.QueryUnescape(sr)
	if err != nil {
		return time.Time{}, errMalformed
	}
	want := resource(hub, device, module)
	gotHub, gotPath, _ := strings.Cut(res, "/")
	wantHub, wantPath, _ := strings.Cut(want, "/")
	if !strings.EqualFold(gotHub, wantHub) || gotPath != wantPath {
		return time.Time{}, fmt.Errorf("%w: the token is for %q, not %q", ErrUnauthorized, res, want)
	}
	expiry, err := strconv.ParseInt(se, 10, 64)
	if err != nil {
		return time.Time{}, errMalformed
	}
	if !now.Before(time.Unix(expiry, 0)) {
		return time.Time{}, fmt.Errorf("%w: the token expired at %s", ErrUnauthorized, time.Unix(expiry, 0).UTC().Format(time.RFC3339))
	}
	sigText, err := url.QueryUnescape(sig)
	if err != nil {
		return time.Time{}, errMalformed
	}
	got, err := base64.StdEncoding.DecodeString(sigText)
	if err != nil {
		return time.Time{}, errMalformed
	}
	if !hmac.Equal(got, sign(key, []byte(sr+"\n"+se))) {
		return time.Time{}, fmt.Errorf("%w: wrong signature", ErrUnauthorized)
	}
	return time.Unix(expiry, 0), nil
}

// NewSAS builds a token as the SDKs do (the resource and the signature
// URL-encoded with nothing kept), valid until expiry.
func NewSAS(hub, device, module string, key []byte, expiry time.Time) string {
	sr := queryEscape(resource(hub, device, module))
	se := strconv.FormatInt(expiry.Unix(), 10)
	sig := base64.StdEncoding.EncodeToString(sign(key, []byte(sr+"\n"+se)))
	return "SharedAccessSignature sr=" + sr + "&sig=" + queryEscape(sig) + "&se=" + se
}

// queryEscape is Python's urllib.parse.quote(s, safe=""): everything but
// letters, digits and "_.-~" is percent-encoded, upper-case hex.
func queryEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("_.-~", c) >= 0 {
			b.WriteByte(c)
			continue
		}
		fmt.Fprintf(&b, "%%%02X", c)
	}
	return b.String()
}

// sortedNames returns the registry's module names, sorted.
func sortedNames(ids map[string]Identity) []string {
	names := make([]string, 0, len(ids))
	for n := range ids {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

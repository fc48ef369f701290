package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"appliance/fleet"
)

// store is the agent's durable state, one bbolt file in the data dir:
//
//	agent/desired   the last valid desired document, as received
//	agent/last      the version and outcome of the last document processed
//	agent/ownKey    the key the device enrolled with (EnrollToken), made
//	                and committed before it is first sent
//	modules/<name>  what the agent created for a module (moduleRecord)
//
// A module record is written as soon as the runtime returns a handle and
// deleted only after the instance is removed, so that the agent never loses
// track of something it created.
type store struct {
	db *bolt.DB
}

var (
	bucketAgent   = []byte("agent")
	bucketModules = []byte("modules")
	keyDesired    = []byte("desired")
	keyLast       = []byte("last")
	keyOwnKey     = []byte("ownKey")
)

// lastRecord is the outcome of the last desired document processed, valid
// or not: versions only move forward from Version.
type lastRecord struct {
	Version     uint64 `json:"version"`
	Seen        bool   `json:"seen"` // a document has been processed
	Code        int    `json:"code"`
	Description string `json:"description,omitempty"`
	// DeploymentID and Layers name the document (reported as
	// lastDesiredDeploymentId, lastDesiredLayers, so that a refusal is
	// counted against the deployment refused).
	DeploymentID string   `json:"deploymentId,omitempty"`
	Layers       []string `json:"layers,omitempty"`
}

// moduleRecord is what the agent created for a module.
type moduleRecord struct {
	Runtime string    `json:"runtime"`
	Handle  string    `json:"handle"`
	Hash    string    `json:"hash"`
	Created time.Time `json:"created"`
}

func openStore(dir, path string) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("%w: %s", ErrDataDirLocked, path)
	}
	if err != nil {
		return nil, fmt.Errorf("open state %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketAgent, bucketModules} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init state %s: %w", path, err)
	}
	return &store{db: db}, nil
}

func (s *store) Close() error { return s.db.Close() }

// load returns everything stored. A record that does not decode is
// reported and skipped: the state file is the agent's own, so that means
// corruption, and starting with less is better than not starting.
func (s *store) load() (desired []byte, last lastRecord, modules map[string]moduleRecord, err error) {
	modules = map[string]moduleRecord{}
	err = s.db.View(func(tx *bolt.Tx) error {
		a := tx.Bucket(bucketAgent)
		if v := a.Get(keyDesired); v != nil {
			desired = append([]byte(nil), v...)
		}
		if v := a.Get(keyLast); v != nil {
			if err := json.Unmarshal(v, &last); err != nil {
				return fmt.Errorf("decode last desired record: %w", err)
			}
		}
		return tx.Bucket(bucketModules).ForEach(func(k, v []byte) error {
			var r moduleRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode module record %q: %w", k, err)
			}
			modules[string(k)] = r
			return nil
		})
	})
	return desired, last, modules, err
}

// saveDesired stores a valid desired document and its outcome together.
func (s *store) saveDesired(payload []byte, last lastRecord) error {
	lb, err := json.Marshal(last)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		a := tx.Bucket(bucketAgent)
		if err := a.Put(keyDesired, payload); err != nil {
			return err
		}
		return a.Put(keyLast, lb)
	})
}

// saveLast stores the outcome of a document that was refused.
func (s *store) saveLast(last lastRecord) error {
	lb, err := json.Marshal(last)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAgent).Put(keyLast, lb)
	})
}

func (s *store) putModule(name string, r moduleRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketModules).Put([]byte(name), b)
	})
}

func (s *store) deleteModule(name string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketModules).Delete([]byte(name))
	})
}

// ownKey returns the device's own key, making it the first time: 32
// random bytes, committed (bbolt fsyncs the commit) before the caller can
// send it. An agent killed before the commit never sent the key and makes
// another next time; one killed after it finds the same key, so whatever
// the controller registered, the agent holds.
func (s *store) ownKey() (string, error) {
	var key string
	err := s.db.Update(func(tx *bolt.Tx) error {
		a := tx.Bucket(bucketAgent)
		if v := a.Get(keyOwnKey); v != nil {
			key = string(v)
			return nil
		}
		k, err := fleet.NewKey()
		if err != nil {
			return err
		}
		key = k
		return a.Put(keyOwnKey, []byte(k))
	})
	if err != nil {
		return "", fmt.Errorf("device's own key: %w", err)
	}
	if err := fleet.ValidateOwnKey(key); err != nil {
		return "", fmt.Errorf("device's own key in the state file is damaged (%v): an operator must give the device a key (appliance device keys regenerate) and run it with --device-key", err)
	}
	return key, nil
}

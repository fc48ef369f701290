// Package ui owns the operator dashboard: one page of plain HTML, CSS and
// JavaScript modules, embedded in the binary so that every node serves it
// at /ui/ with nothing fetched from elsewhere (sites are air-gapped).
//
// The page holds no secrets and needs none to load: it asks the operator
// for the admin token, keeps it in sessionStorage and sends it as a bearer
// token on every call to /api/v1/, so the API stays the only place that
// checks it. It acts only through the API, as the CLI does: everything it
// shows or changes an operator can also do with curl.
//
// The files (static/):
//
//	index.html, app.css   the frame and the styles
//	app.js                the hash router (the routes are listed there)
//	lib.js, shell.js      elements, API calls, formatting; sign-in, polling, notices
//	overview.js           the fleet overview (GET /overview)
//	deployments.js        the deployment list and one deployment, delete with its dry run
//	deployment-form.js    create (manifest expanded by POST /manifests/expand) and update, dry run first
//	dryrun.js             a dry run's result, unknown fields shown as they come
//	condition.js          condition inputs checked as typed (POST /conditions/check)
//	devices.js, device.js the device list (paged, searched, filtered) and one device
//
// Pages build the DOM with element and text nodes only (never innerHTML:
// ids and tags are operator and device input); views poll the node while
// shown and stop when the route changes; forms are built once and never
// re-rendered under the operator's hands.
package ui

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed static
var static embed.FS

// Prefix is where the node mounts Handler: srv.Handle(ui.Prefix, ui.Handler()).
const Prefix = "/ui/"

// contentSecurityPolicy lets the page load only its own files and talk only
// to its own node: no inline script, nothing from another origin.
const contentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Handler serves the dashboard's files under Prefix. Paths are relative to
// it: /ui/ is the page, /ui/app.js its script.
func Handler() http.Handler {
	files, err := fs.Sub(static, "static")
	if err != nil {
		panic(err) // the embed pattern above guarantees the directory
	}
	fileServer := http.StripPrefix(Prefix, http.FileServerFS(files))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		h := w.Header()
		h.Set("Content-Security-Policy", contentSecurityPolicy)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		// The files change with the binary; revalidating on every load
		// keeps a browser from mixing an old script with a new node.
		h.Set("Cache-Control", "no-cache")
		fileServer.ServeHTTP(w, r)
	})
}

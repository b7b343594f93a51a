// Swagger UI on the service's own description; a file of its own, as the page's CSP allows no inline script.
"use strict";
window.ui = SwaggerUIBundle({ url: "openapi.json", dom_id: "#swagger-ui" });
